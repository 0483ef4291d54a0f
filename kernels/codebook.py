"""Classify a code -> value table into the cheapest exact decode rule the fast kernels know.

Every format is ``W = table[code] * scale + offset`` (see docs/INTERFACES.md). The table itself is
arbitrary, but most real tables have structure the CPU can exploit instead of a memory lookup:

- ``affine``: ``table[k] == t0 + t1 * k`` (all integer types, MX-INT). The kernel decodes
  ``float(code)`` and folds ``t0, t1`` into the group scale and offset.
- ``exmy``: ``table == c * grid(E, M)`` where ``grid`` is the sign-magnitude ExMy grid with
  subnormals and no Inf/NaN (FP4 E2M1, FP6 E3M2/E2M3, FP8 E4M3/E5M2, MXFP4). The kernel builds the
  float32 bit pattern arithmetically (the FP6-LLM trick, on CPU) and folds ``c`` into the scale.
- ``lut16``: any other table with at most 16 entries (NF4, per-row codebooks); decoded by a
  branch-free select tree over 16 register-resident values.
- ``gather``: anything else (e.g. 64/256-entry per-row codebooks); a memory lookup per weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Candidate float layouts per code width: (exponent bits, mantissa bits). One sign bit on top.
EXMY_CANDIDATES: dict[int, tuple[tuple[int, int], ...]] = {
    4: ((2, 1), (1, 2), (3, 0)),
    5: ((2, 2), (3, 1)),
    6: ((3, 2), (2, 3)),
    8: ((4, 3), (5, 2)),
}


def exmy_grid(n_exp: int, n_man: int, bias: int | None = None) -> np.ndarray:
    """Values of every code of a sign-magnitude ExMy float with subnormals and no Inf/NaN.

    Args:
        n_exp, n_man: exponent and mantissa bit counts; the code has ``1 + n_exp + n_man`` bits,
            sign first (``code >> (n_exp + n_man)``).
        bias: exponent bias; default ``2**(n_exp-1) - 1``.
    Returns:
        float64 array (2**(1+n_exp+n_man),).
    """
    if bias is None:
        bias = 2 ** (n_exp - 1) - 1
    n_mag = 1 << (n_exp + n_man)
    mag = np.arange(n_mag)
    e = mag >> n_man
    m = mag & ((1 << n_man) - 1)
    sub = m * 2.0 ** (1 - bias - n_man)
    normal = (1.0 + m / 2.0**n_man) * 2.0 ** (e.astype(np.float64) - bias)
    vals = np.where(e == 0, sub, normal)
    return np.concatenate([vals, -vals])


@dataclass(frozen=True)
class Decode:
    """How the kernel turns a code into a value; ``value = mult * base(code) + add``.

    kind: "affine" (base = code), "exmy" (base = exmy_grid(E, M, bias)[code]), "lut16", "gather"
    (base = table row). ``exmy`` holds (E, M, bias) for kind "exmy".
    """

    kind: str
    mult: float = 1.0
    add: float = 0.0
    exmy: tuple[int, int, int] = (0, 0, 0)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    tol = 1e-6 * max(float(np.abs(a).max(initial=0.0)), 1e-30)
    return bool(np.all(np.abs(a - b) <= tol))


def classify_table(table: np.ndarray, bits: int) -> Decode:
    """Find the cheapest exact decode rule for ``table``.

    Args:
        table: float32 (2**bits,) shared or (rows, 2**bits) per-row table. Non-finite entries are
            ignored (codes must never point at them; ``pack_linear`` checks).
        bits: code width.
    Returns:
        a :class:`Decode`.
    """
    t = np.asarray(table, dtype=np.float64)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 1:
        finite = np.isfinite(t)
        k = np.arange(t.shape[0], dtype=np.float64)
        if finite.sum() >= 2:
            kf, tf = k[finite], t[finite]
            t1 = (tf[-1] - tf[0]) / (kf[-1] - kf[0])  # exact for integer grids, unlike a fit
            t0 = tf[0] - t1 * kf[0]
            if _close(t[finite], t0 + t1 * k[finite]):
                return Decode("affine", mult=float(t1), add=float(t0))
        for n_exp, n_man in EXMY_CANDIDATES.get(bits, ()):
            grid = exmy_grid(n_exp, n_man)
            ref = int(np.argmax(np.where(finite, np.abs(grid), -1.0)))
            if grid[ref] == 0:
                continue
            mult = t[ref] / grid[ref]
            if mult != 0 and _close(t[finite], mult * grid[finite]):
                return Decode("exmy", mult=float(mult), exmy=(n_exp, n_man, 2 ** (n_exp - 1) - 1))
    if t.shape[-1] <= 16:
        return Decode("lut16")
    return Decode("gather")
