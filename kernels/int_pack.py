"""Bit packing of integer codes along the input dimension (vectorized torch).

Layouts (``codes`` is (out, n) with ``n`` a multiple of 8; byte ``j`` of a row covers codes
``U*j .. U*j+U-1``, lowest bits first, so ``unit`` U codes share a byte):

- ``crumb2`` (2-bit): 4 codes per byte, ``byte = c0 | c1<<2 | c2<<4 | c3<<6``.
- ``nib4``  (4-bit): 2 codes per byte, ``byte = c0 | c1<<4``.
- ``byte8`` (8-bit): one code per byte.
- ``planes`` (any other width, e.g. 3-bit): ``bits`` bit planes, each 1 bit per code, 8 codes per
  byte (``bit r of byte j of plane p = bit p of code 8j+r``), stored plane-major per row as
  (out, bits * n/8). Chosen over a 2+1 split for 3-bit because every plane has the same indexing
  (byte j of each plane covers the same 8 codes), so one decode loop serves 1/3/5/7-bit codes and
  the storage is exactly ``bits`` bits per code.
- ``split6`` (6-bit): FP6-LLM 4+2 split, see :mod:`kernels.fp6`.
"""
from __future__ import annotations

import torch

UNIT = {"crumb2": 4, "nib4": 2, "byte8": 1, "planes": 8, "split6": 4}


def layout_for_bits(bits: int) -> str:
    """Storage layout used for ``bits``-bit codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return {2: "crumb2", 4: "nib4", 6: "split6", 8: "byte8"}.get(bits, "planes")


def pack_subbyte(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit codes (bits in 1, 2, 4) ``8 // bits`` per byte, lowest bits first.

    Args:
        codes: integer (out, n), n a multiple of ``8 // bits``, values < 2**bits.
    Returns:
        uint8 (out, n * bits // 8).
    """
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, per)
    out = torch.zeros(c.shape[:2], dtype=torch.uint8, device=codes.device)
    for r in range(per):
        out |= c[:, :, r] << (bits * r)
    return out


def unpack_subbyte(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_subbyte`: uint8 (out, m) -> uint8 (out, m * 8 // bits)."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * r)) & mask for r in range(per)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-plane packing: uint8 (out, bits * n / 8), plane p at columns [p*n/8, (p+1)*n/8)."""
    c = codes.to(torch.uint8)
    return torch.cat([pack_subbyte((c >> p) & 1, 1) for p in range(bits)], dim=1)


def unpack_planes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: -> uint8 (out, n)."""
    nb = packed.shape[1] // bits
    out = None
    for p in range(bits):
        plane = unpack_subbyte(packed[:, p * nb:(p + 1) * nb], 1) << p
        out = plane if out is None else out | plane
    return out


def pack_codes(codes: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Pack (out, n) codes (n a multiple of 8) into the named uint8 buffers of their layout."""
    if codes.shape[1] % 8:
        raise ValueError("pack_codes needs the input dimension padded to a multiple of 8")
    layout = layout_for_bits(bits)
    if layout == "byte8":
        return {"qweight": codes.to(torch.uint8).contiguous()}
    if layout in ("crumb2", "nib4"):
        return {"qweight": pack_subbyte(codes, bits).contiguous()}
    if layout == "split6":
        from .fp6 import pack_fp6_split

        return pack_fp6_split(codes)
    return {"qweight": pack_planes(codes, bits).contiguous()}


def unpack_codes(packed: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` -> uint8 (out, n)."""
    layout = layout_for_bits(bits)
    if layout == "byte8":
        return packed["qweight"].clone()
    if layout in ("crumb2", "nib4"):
        return unpack_subbyte(packed["qweight"], bits)
    if layout == "split6":
        from .fp6 import unpack_fp6_split

        return unpack_fp6_split(packed)
    return unpack_planes(packed["qweight"], bits)
