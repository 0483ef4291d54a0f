"""Slow, obviously-correct versions of every kernel; the tests hold the fast paths to these.

Each function states the per-element formula of its layout directly (numpy fancy indexing over
every element index, no bit tricks shared with the fast code).
"""
from __future__ import annotations

import numpy as np
import torch

from .int_pack import layout_for_bits


def pack_reference(codes: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """Pack (out, n) codes, n % 8 == 0, one element at a time. Same layouts as ``pack_codes``."""
    codes = np.asarray(codes, dtype=np.int64)
    n_out, n = codes.shape
    layout = layout_for_bits(bits)
    if layout == "byte8":
        return {"qweight": codes.astype(np.uint8)}
    if layout == "split6":
        q4 = np.zeros((n_out, n // 2), np.int64)
        q2 = np.zeros((n_out, n // 4), np.int64)
        for o in range(n_out):
            for i in range(n):
                q4[o, i // 2] |= (codes[o, i] & 15) << (4 * (i % 2))
                q2[o, i // 4] |= (codes[o, i] >> 4) << (2 * (i % 4))
        return {"q4": q4.astype(np.uint8), "q2": q2.astype(np.uint8)}
    if layout in ("crumb2", "nib4"):
        per = 8 // bits
        q = np.zeros((n_out, n // per), np.int64)
        for o in range(n_out):
            for i in range(n):
                q[o, i // per] |= codes[o, i] << (bits * (i % per))
        return {"qweight": q.astype(np.uint8)}
    nb = n // 8
    q = np.zeros((n_out, bits * nb), np.int64)
    for o in range(n_out):
        for i in range(n):
            for p in range(bits):
                q[o, p * nb + i // 8] |= ((codes[o, i] >> p) & 1) << (i % 8)
    return {"qweight": q.astype(np.uint8)}


def unpack_reference(packed: dict, bits: int, n: int) -> np.ndarray:
    """Codes (out, n) from packed buffers, by the per-element formula of each layout."""
    p = {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v).astype(np.int64)
         for k, v in packed.items()}
    layout = layout_for_bits(bits)
    i = np.arange(n)
    if layout == "byte8":
        return p["qweight"][:, :n].copy()
    if layout == "split6":
        lo = (p["q4"][:, i // 2] >> (4 * (i % 2))) & 15
        hi = (p["q2"][:, i // 4] >> (2 * (i % 4))) & 3
        return (hi << 4) | lo
    if layout in ("crumb2", "nib4"):
        per = 8 // bits
        return (p["qweight"][:, i // per] >> (bits * (i % per))) & ((1 << bits) - 1)
    q = p["qweight"]
    nb = q.shape[1] // bits
    out = np.zeros((q.shape[0], n), np.int64)
    for b in range(bits):
        out |= ((q[:, b * nb + i // 8] >> (i % 8)) & 1) << b
    return out


def dequantize_reference(codes, table, scales, offsets, group_size, outliers=None) -> torch.Tensor:
    """``W[o, i] = table[codes[o, i]] * scales[o, i // g] + offsets[o, i // g]`` + outliers.

    Args:
        codes: (out, in) integer; table: (K,) or (out, K); scales/offsets: (out, n_groups) or
        offsets None; outliers: None or (indices (nnz, 2) [row, col], values (nnz,)).
    Returns:
        float32 (out, in).
    """
    codes = torch.as_tensor(np.asarray(codes)).long()
    table = torch.as_tensor(table).float()
    n_out, n_in = codes.shape
    col_group = torch.arange(n_in) // group_size
    if table.ndim == 1:
        values = table[codes]
    else:
        values = torch.gather(table, 1, codes)
    W = values * scales.float()[:, col_group]
    if offsets is not None:
        W = W + offsets.float()[:, col_group]
    if outliers is not None:
        idx, val = outliers
        idx = torch.as_tensor(idx).long()
        W = W.index_put((idx[:, 0], idx[:, 1]), torch.as_tensor(val).float(), accumulate=True)
    return W


def matmul_reference(x: torch.Tensor, W: torch.Tensor, bias=None, input_scale=None) -> torch.Tensor:
    """``y = (x / input_scale) @ W.T + bias`` in float64 then float32 (obviously correct)."""
    x = x.double()
    if input_scale is not None:
        x = x / input_scale.double()
    y = x @ W.double().T
    if bias is not None:
        y = y + bias.double()
    return y.float()
