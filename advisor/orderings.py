"""Orderings that hold for round-to-nearest on every model, enforced on predictions by construction.

A spec A is *at least as fine* as a spec B (``finer_or_equal``) when both use the same method, method
options and symmetry, and

- A's group is at least as fine: per channel is the coarsest, then groups by size (g256 > g128 > g64 ...;
  MX types have their fixed block of 32 and compare only with MX types), and
- A's data type is at least as fine as B's (``dtype_finer_or_equal``): the same family with more bits
  for integers (int2 < int3 < int4 < int8), normal-float codebooks (nf3 < nf4) and MX integers; for
  floating point (plain or as MX elements) at least as many exponent bits, at least as many mantissa
  bits and a largest value at least as high within its top binade (the grid's top mantissa: fp6_e3m2
  and fp8_e4m3 reach 1.75, fp6_e2m3 1.875, fp4_e2m1 1.5). The last condition matters where the scale
  is a power of two (MX): a block's largest weight lands in the top binade and a format whose grid
  stops lower saturates more, which is why ``mxfp8_e4m3`` is measured worse than ``mxfp6_e2m3`` on
  SmolLM2 and is not ordered against it. Different families (int vs fp, int4 vs nf4) are not ordered.

This is a partial order (a product of the two orders). For RTN an at-least-as-fine format has an
error no larger in expectation, so its loss is no larger; the predictor's fitted method terms keep a
method's predictions in the same order. ``consistent`` enforces ``pred(A) <= pred(B)`` whenever A is
finer than B, on the predicted centre and on both interval bounds, over the set of specs predicted
together (the candidates and the measured neighbours ``advisor.api.predict_candidates`` adds):

1. The centre is projected onto the monotone cone: the weighted least-squares fit that respects the
   order (isotonic regression over a partial order, ``isotonic``), weighted by the inverse predictive
   variance of each row; a row whose physics term is an estimate (no RTN loss measured) weighs
   ``ESTIMATE_WEIGHT`` of that, so measurements decide and estimates yield.
2. The bounds of rows with a measured RTN loss are made to respect the order by widening only (a
   coarser spec's upper bound becomes at least every finer one's, a finer spec's lower bound at most
   every coarser one's): an interval that is deliberately wide (the method guard) stays so.
3. A row whose physics is estimated takes its bounds from its measured neighbours, which cover it: the
   lower bound reaches down to the largest lower bound of a measured finer format, or to 0 (the float
   model's loss) where none is measured; the upper bound is the smallest upper bound of a measured
   coarser format (the estimate is capped by what a coarser format was measured to lose, and reaches
   it), or, where none is measured, the estimate's own, raised to cover measured finer formats.
4. Every bound is closed under the order once more by widening only (this moves only estimated rows:
   step 3 kept them inside their measured neighbours' bounds), and each interval holds its centre.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable

import numpy as np

# Relative weight of a row whose physics term is the second-order estimate: it yields to measured rows
ESTIMATE_WEIGHT = 1e-6


@lru_cache(maxsize=None)
def _fp_shape(name: str) -> tuple[int, int, float] | None:
    """(exponent bits, mantissa bits, top mantissa) of a floating-point element format, else None."""
    from advisor.quantizers import get_dtype

    dt = get_dtype(name)
    elem = dt.element if dt.family == "mx" else name
    if not elem or not elem.startswith("fp") or "_e" not in elem:
        return None
    e, m = elem.split("_e", 1)[1].split("m")
    top = get_dtype(elem).max_abs
    return int(e), int(m), top / 2.0 ** math.floor(math.log2(top))


@lru_cache(maxsize=None)
def dtype_finer_or_equal(a: str, b: str) -> bool:
    """Whether data type ``a`` is at least as fine as ``b`` (module docstring); reflexive."""
    from advisor.quantizers import get_dtype

    if a == b:
        return True
    da, db = get_dtype(a), get_dtype(b)
    if da.family != db.family:
        return False
    fa, fb = _fp_shape(a), _fp_shape(b)
    if fa is None and fb is None:  # int, nf, mxint: more bits of the same grid construction
        return da.bits >= db.bits
    if fa is None or fb is None:  # mxint vs mxfp
        return False
    return fa[0] >= fb[0] and fa[1] >= fb[1] and fa[2] >= fb[2] - 1e-12


def _group_rank(group_size: int | None) -> float:
    return math.inf if group_size is None else float(group_size)


def finer_or_equal(a, b) -> bool:
    """Whether spec ``a`` is at least as fine as spec ``b`` (``QuantSpec`` or strings); reflexive."""
    from advisor.quantizers import QuantSpec

    a = QuantSpec.parse(a) if isinstance(a, str) else a
    b = QuantSpec.parse(b) if isinstance(b, str) else b
    if (a.method, a.symmetric, a.options) != (b.method, b.symmetric, b.options):
        return False
    return dtype_finer_or_equal(a.dtype, b.dtype) and _group_rank(a.group_size) <= _group_rank(b.group_size)


def order_matrix(specs: Iterable) -> np.ndarray:
    """``M[i, j]``: spec i is strictly finer than spec j (transitive; identical specs are not ordered)."""
    from advisor.quantizers import QuantSpec

    specs = [QuantSpec.parse(s) if isinstance(s, str) else s for s in specs]
    n = len(specs)
    M = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            if i != j and specs[i] != specs[j] and finer_or_equal(specs[i], specs[j]):
                M[i, j] = True
    return M


def _covers(M: np.ndarray) -> list[tuple[int, int]]:
    """The order's cover pairs (its transitive reduction): i < j with nothing strictly between."""
    between = (M.astype(np.int64) @ M.astype(np.int64)) > 0
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(M & ~between))]


def isotonic(y: np.ndarray, w: np.ndarray, M: np.ndarray) -> np.ndarray:
    """The weighted isotonic regression of ``y`` over the partial order ``M`` (``M[i, j]``: x_i <= x_j).

    min sum_i w_i (x_i - y_i)^2 subject to x_i <= x_j for every ordered pair, solved through its dual,
    a non-negative least-squares problem (Lawson-Hanson, ``scipy.optimize.nnls``): with D the constraint
    rows (x_i - x_j <= 0 per cover pair), lambda >= 0 minimizes ||W^-1/2 D^T lambda - W^1/2 y||^2 and
    x = y - W^-1 D^T lambda. A last pass in topological order removes rounding-level violations, so the
    result respects the order exactly. ``isotonic_reference`` is the slow reference.
    """
    from scipy.optimize import nnls

    y, w = np.asarray(y, float), np.asarray(w, float)
    pairs = _covers(M)
    if not pairs or np.all(~M | (y[:, None] <= y[None, :])):
        return y.copy()
    D = np.zeros((len(pairs), len(y)))
    for k, (i, j) in enumerate(pairs):
        D[k, i], D[k, j] = 1.0, -1.0
    lam, _ = nnls((D / np.sqrt(w)).T, np.sqrt(w) * y, maxiter=50 * max(len(pairs), 10))
    x = y - (D.T @ lam) / w
    order = np.argsort(M.sum(axis=0), kind="stable")  # finest first: fewer rows finer than them
    for j in order:
        below = M[:, j]
        if below.any():
            x[j] = max(x[j], float(x[below].max()))
    return x


def isotonic_reference(y: np.ndarray, w: np.ndarray, M: np.ndarray) -> np.ndarray:
    """The same problem by a general constrained solver (SLSQP on every ordered pair): slow, for tests."""
    from scipy.optimize import minimize

    y, w = np.asarray(y, float), np.asarray(w, float)
    idx = np.argwhere(M)
    if not len(idx):
        return y.copy()
    A = np.zeros((len(idx), len(y)))
    A[np.arange(len(idx)), idx[:, 1]], A[np.arange(len(idx)), idx[:, 0]] = 1.0, -1.0  # x_j - x_i >= 0
    res = minimize(lambda x: float(np.sum(w * (x - y) ** 2)), y, jac=lambda x: 2 * w * (x - y), method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda x: A @ x, "jac": lambda x: A}],
                   options={"ftol": 1e-14, "maxiter": 1000})
    return res.x


def _close(lower: np.ndarray, upper: np.ndarray, M: np.ndarray) -> None:
    """Make the bounds respect the order ``M`` by widening only, in place: a coarser spec's upper bound is at
    least every finer one's, a finer spec's lower bound at most every coarser one's (``M`` is transitive,
    so one pass suffices)."""
    for j in np.flatnonzero(M.any(axis=0)):
        upper[j] = max(upper[j], float(upper[M[:, j]].max()))
    for i in np.flatnonzero(M.any(axis=1)):
        lower[i] = min(lower[i], float(lower[M[i, :]].min()))


def consistent(specs: list, mean: np.ndarray, lower: np.ndarray, upper: np.ndarray, variance: np.ndarray,
               estimated: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions of ``specs`` (predicted together) made to respect the order (module docstring, steps 1-4).

    Args:
        mean, lower, upper: predicted dL and its interval per spec (nats).
        variance: each prediction's variance (nats^2), for the weights of the centre's projection.
        estimated: rows whose physics term is the second-order estimate (no RTN loss measured).
    Returns:
        (mean, lower, upper), each respecting the order; lower <= mean <= upper.
    """
    mean, lower, upper = (np.asarray(a, float).copy() for a in (mean, lower, upper))
    estimated = np.asarray(estimated, bool)
    M = order_matrix(specs)
    if not M.any():
        return mean, lower, upper
    w = 1.0 / np.maximum(np.asarray(variance, float), 1e-18)
    mean = isotonic(mean, np.where(estimated, ESTIMATE_WEIGHT * w, w), M)
    measured = ~estimated
    _close(lower, upper, M & measured[:, None] & measured[None, :])
    for s in np.flatnonzero(estimated):
        finer, coarser = M[:, s] & measured, M[s, :] & measured
        floor = float(lower[finer].max()) if finer.any() else -math.inf
        lower[s] = max(floor, min(lower[s], 0.0))
        if coarser.any():
            upper[s] = float(upper[coarser].min())
        elif finer.any():
            upper[s] = max(upper[s], float(upper[finer].max()))
    _close(lower, upper, M)
    return mean, np.minimum(lower, mean), np.maximum(upper, mean)
