"""Compiled inner loop of QuantEase coordinate descent: one lazy block of columns.

``cd_block`` does, for columns ``j = b0 .. b1-1`` in order, exactly what ``quantease.CDState.cd_pass``
does with torch ops (the reference): ``u = W_hat_j + G_j / S_jj``; on rounding passes (or if
``S_jj = 0``) ``u`` is rounded to the column's grid (same index rule as ``grid.Rounder``: the exact
float64 nearest-integer for evenly spaced grids, else binary search on the midpoints, ties down); then
``d = u - W_hat_j`` updates ``G`` for the remaining columns of the block. The GEMM that carries the
block's changes to later columns stays in torch. Arrays are the transposed ``(in, out)`` numpy views
of the torch tensors, modified in place; float32 or float64.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _nearest(y, uniform, g0, step, last, mid):
    if uniform:
        t = math.ceil(np.float64(y) / step - 0.5) - g0 / step
        if t < 0.0:
            t = 0.0
        elif t > last:
            t = last
        return int(t)
    lo, hi = 0, mid.shape[0]  # first midpoint >= y  (bucketize, right=False)
    while lo < hi:
        m = (lo + hi) >> 1
        if mid[m] < y:
            lo = m + 1
        else:
            hi = m
    return lo


@njit(cache=True, nogil=True)
def cd_block(What, G, codes, S, diag, b0, b1, scale, zp, has_zp, rounding,
             uniform, g0, step, last, grid, mid, grid_codes, delta):
    """One block of a coordinate-descent pass (see module docstring).

    Args:
        What, G: ``(in, out)`` current ``W_hat^T`` and ``((T - W_hat) S)^T``; codes: ``(in, out)`` int64.
        S: ``(in, in)``; diag: ``(in,)`` its diagonal. scale, zp: ``(in, out)`` per-column grid.
        grid, mid, grid_codes: sorted grid values, midpoints, code of each grid value.
        delta: ``(b1 - b0, out)`` output, the change of each column.
    """
    out = What.shape[1]
    for j in range(b0, b1):
        dj = diag[j]
        drow = delta[j - b0]
        for r in range(out):
            w_old = What[j, r]
            u = w_old + G[j, r] / dj if dj > 0 else w_old
            if rounding or not dj > 0:
                s = scale[j, r]
                y = u / s
                if has_zp:
                    y = y + zp[j, r]
                idx = _nearest(y, uniform, g0, step, last, mid)
                u = grid[idx] * s
                if has_zp:
                    u = u + (-zp[j, r] * s)
                codes[j, r] = grid_codes[idx]
            drow[r] = u - w_old
            What[j, r] = u
        for k in range(j + 1, b1):
            sjk = S[j, k]
            for r in range(out):
                G[k, r] -= sjk * drow[r]
