"""Outlier-aware QuantEase (Behdin et al. 2023, reference ``method/quantease_outlier.py``, unstructured).

``W_hat = Q + H_sp``: ``Q`` on the low-bit grid, ``H_sp`` sparse in full precision with
``||H_sp||_0 <= k``, ``k = round(f * out * in)`` (default ``f = 1 %``). Minimize
``||W X - (Q + H_sp) X||_F^2`` by alternating, once per pass:

1. one QuantEase coordinate-descent sweep on ``Q`` with target ``W - H_sp`` (same closed-form update,
   relaxation schedule and fixed grid as ``quantease``);
2. one iterative-hard-thresholding step on ``H_sp``:
   ``H_sp <- P_k(H_sp - eta * (Q + H_sp - W) S)``, ``eta = alpha / (2 lambda_max(S))``, ``alpha = 1``,
   where ``P_k`` keeps the ``k`` entries of largest magnitude.

Init: ``H_sp`` = the ``k`` largest ``|W|``, ``Q`` starts from ``W`` with those entries zeroed. The grid of
each row/group is fitted to the weights *without the initial outliers* and then held fixed. (The
reference trims ``round(g * f / 2)`` values from each end of every row/group range instead; that can
exclude more weights than the outlier budget holds, which then clip: at 8 bits this made the result
many times worse than RTN on our test layer. Excluding exactly the initial outlier set is the
unstructured analogue of the paper's structured rule, "grid fitted excluding the outlier columns".)
Outlier values are stored as fp16 and cost ``48 * f`` bits per weight (fp16 value + 32-bit flat index),
see ``QuantSpec.bits_per_weight``.
Like ``quantease``, the rounded iterate (Q, H_sp) with the lowest objective is returned.
"""
from __future__ import annotations

import torch

from .base import LayerStats, Method, QuantizedWeight, register, weight_from_grid
from .dtypes import DataType, get_dtype
from .grid import compute_grid_params
from .quantease import CDState, is_rounding_pass
from .spec import Option, QuantSpec

__all__ = ["quantease_outlier_quantize_weight", "quantease_outlier_quantize", "OUTLIER_BITS"]

OUTLIER_BITS = 16 + 32  # fp16 value + int32 flat index per outlier


def _top_k(M: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest-magnitude entries of ``M``, zero the rest."""
    flat = M.reshape(-1)
    out = torch.zeros_like(flat)
    if k > 0:
        idx = flat.abs().topk(k).indices
        out[idx] = flat[idx]
    return out.view_as(M)


def quantease_outlier_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    dtype: DataType,
    group_size: int | None,
    symmetric: bool = True,
    *,
    outlier_fraction: float = 0.01,
    n_iter: int = 30,
    act_order: bool = False,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, "GridParams", torch.Tensor, torch.Tensor, dict]:  # noqa: F821
    """Outlier-aware QuantEase for one layer.

    Args:
        W: ``(out, in)``; H: ``(in, in)`` ``S = sum x x^T``.
        outlier_fraction: ``f``, fraction of weights kept in full precision (unstructured).
        n_iter: passes; act_order: visit columns by decreasing ``S_jj``; alpha: IHT step multiplier.
    Returns:
        codes ``(out, in)`` long, ``GridParams``, ``Q (out, in)`` (grid part), ``H_sp (out, in)`` (sparse
        part, fp16-exact, at most ``k`` non-zeros), info.
    """
    fdt = torch.float64 if W.dtype == torch.float64 else torch.float32  # float64 only for tests
    W = W.detach().to(fdt)
    S = H.detach().to(fdt)
    out, cols = W.shape
    k = int(round(outlier_fraction * out * cols))
    H0 = _top_k(W, k)
    params = compute_grid_params(W, dtype, group_size, symmetric, exclude=H0 != 0)
    perm = torch.argsort(torch.diagonal(S), descending=True) if act_order else None
    state = CDState(params, S, perm, out)
    Wp = W if perm is None else W[:, perm]
    Sp = state.S
    lam_max = float(torch.linalg.eigvalsh(Sp.double())[-1])
    step = alpha / (2.0 * lam_max) if lam_max > 0 else 0.0

    Hs_t = (H0 if perm is None else H0[:, perm]).t().contiguous()  # (in, out) sparse part, like W_hat
    What_t = (Wp.t() - Hs_t).contiguous()  # zero where H_sp holds the weight
    codes_t = torch.zeros(cols, out, dtype=torch.long)
    P_t = Sp @ Wp.t()  # (W S)^T

    objectives: list[float | None] = []
    best = (float("inf"), None, None, None, -1)
    rounded_prev = False
    for it in range(n_iter + 1):
        # G = (W - H_sp - Q) S: the CD gradient for Q, and minus the IHT gradient for H_sp
        G_t = P_t - Sp @ (What_t + Hs_t)
        if rounded_prev:
            f = float(((Wp.t() - What_t - Hs_t) * G_t).sum())
            objectives.append(f)
            if f < best[0]:
                best = (f, What_t.clone(), codes_t.clone(), Hs_t.clone(), it - 1)
        elif it > 0:
            objectives.append(None)
        if it == n_iter:
            break
        rounded_prev = is_rounding_pass(it, n_iter)
        state.cd_pass(What_t, G_t.clone(), codes_t, rounded_prev)
        if k > 0:
            R_t = Sp @ (What_t + Hs_t - Wp.t())  # ((Q + H_sp - W) S)^T
            Hs_t = _top_k(Hs_t - step * R_t, k)
            Hs_t = Hs_t.to(torch.float16).to(fdt)  # stored as fp16

    _, What_t, codes_t, Hs_t, best_pass = best
    Q, codes, Hs = What_t.t(), codes_t.t(), Hs_t.t()
    if perm is not None:
        inv = torch.argsort(perm)
        Q, codes, Hs = Q[:, inv], codes[:, inv], Hs[:, inv]
    info = {"objective_per_pass": objectives, "best_pass": best_pass, "n_iter": n_iter,
            "n_outliers": int((Hs != 0).sum()), "outlier_budget": k}
    return codes.contiguous(), params, Q.contiguous(), Hs.contiguous(), info


def quantease_outlier_quantize(W: torch.Tensor, spec: QuantSpec, stats: LayerStats) -> QuantizedWeight:
    """Registered entry point (options ``o`` fraction, ``it``, ``act``)."""
    codes, params, _, Hs, info = quantease_outlier_quantize_weight(
        W, stats.H, get_dtype(spec.dtype), spec.group_size, spec.symmetric,
        outlier_fraction=spec.option("o"), n_iter=spec.option("it"), act_order=spec.option("act"),
    )
    idx = Hs.nonzero()  # (nnz, 2) [row, col]
    outliers = (idx, Hs[idx[:, 0], idx[:, 1]].contiguous())
    return weight_from_grid(codes, params, spec, outliers=outliers, info=info)


def _outlier_bits(spec: QuantSpec, in_features: int | None) -> float:
    return OUTLIER_BITS * spec.option("o")


register(Method(
    name="quantease-outlier",
    description="outlier-aware QuantEase: CD on the grid part alternated with hard thresholding of a "
                "sparse fp16 part (default 1 % of weights)",
    requires=frozenset({"hessian"}),
    fn=quantease_outlier_quantize,
    options=(
        Option("o", float, 0.01, "fraction of weights kept as fp16 outliers", max_value=0.5),
        Option("it", int, 30, "number of passes (CD sweep + IHT step)", max_value=10_000),
        Option("act", bool, False, "visit columns by decreasing H_jj"),
    ),
    extra_bits=_outlier_bits,
))
