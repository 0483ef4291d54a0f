"""FP6 storage in the 4+2 split layout of FP6-LLM (arXiv 2401.14112, section 5.3).

Each 6-bit code ``c`` is split into a 2-bit segment ``c >> 4`` (sign and exponent MSB for E3M2)
and a 4-bit segment ``c & 15``; the two segment streams live in separate arrays, each packed
independently with power-of-two widths (``q2``: 4 segments per byte, ``q4``: 2 per byte, both
lowest bits first along the input dimension), so every load is byte-aligned and the index math is
shifts. Re-stitching is ``(seg2 << 4) | seg4``. The GPU paper additionally re-orders segments
for warp-level 32-bit loads; on CPU the kernel reads whole rows, so plain row order is kept.
"""
from __future__ import annotations

import torch

from .int_pack import pack_subbyte, unpack_subbyte


def pack_fp6_split(codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """(out, n) 6-bit codes, n % 4 == 0 -> {"q4": uint8 (out, n/2), "q2": uint8 (out, n/4)}."""
    c = codes.to(torch.uint8)
    return {
        "q4": pack_subbyte(c & 15, 4).contiguous(),
        "q2": pack_subbyte(c >> 4, 2).contiguous(),
    }


def unpack_fp6_split(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`pack_fp6_split` -> uint8 (out, n)."""
    return unpack_subbyte(packed["q4"], 4) | (unpack_subbyte(packed["q2"], 2) << 4)
