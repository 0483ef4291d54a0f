"""QuantEase (Behdin et al. 2023, arXiv 2309.01885): coordinate descent on the layer objective.

Problem: ``min_{W_hat on the grid} f(W_hat) = ||W X - W_hat X||_F^2 = tr((W - W_hat) S (W - W_hat)^T)``
with ``S = X X^T`` (``LayerStats.H``). ``f`` separates over rows, so one coordinate step updates a whole
column ``j`` for every row. With all other entries fixed, ``f`` is a convex quadratic in ``W_hat[:, j]``
(curvature ``S_jj``) whose minimizer is (paper Lemma 1)

    beta_j = W_hat[:, j] + [(W - W_hat) S]_j / S_jj

and the best grid value is the grid point nearest ``beta_j`` (round to nearest). No inverse, no
Cholesky. ``P = W S`` is formed once; ``G = (W - W_hat) S = P - W_hat S`` is refreshed once per pass
(one GEMM) and kept current inside the pass: columns are visited in lazy blocks of 128; a change ``d``
of column ``j`` updates ``G`` for the rest of its block at once (rank-1) and for the columns after the
block with one GEMM when the block ends (same arithmetic as the reference's per-column row-vector
products, batched). The in-block column loop runs in a numba kernel (``cd_kernel.cd_block``); the torch
loop ``CDState._block_reference`` is its reference, tested equal.

Faithful to the reference ``method/quantease.py`` / ``method/gptq_quantease.py``:
- start from the GPTQ solution and keep GPTQ's grid (the reference's ``gptq_quantease``; the registered
  method's default), or, with option ``winit``, from ``W_hat = W`` with a grid (per row or group
  scale/zero point) computed once from the original ``W`` and held fixed (the paper's basic algorithm).
  Why GPTQ initialisation is the default: on SmolLM2-135M's attention output projections (inputs are
  mixtures of few shared GQA value heads, Hessian condition numbers 1e5..1e7) CD from ``W`` stops in
  coordinate-wise minima 3-36 % *worse* than GPTQ, while CD from GPTQ was better than GPTQ on every
  layer measured and about as good as or better than CD from ``W`` elsewhere
  (benchmarks/quantizers_layer_error.py, rows ``quantease`` vs ``quantease:winit``);
- 30 passes by default; on passes with ``it % 3 == 1`` (only while ``it <= 25``, never the last pass)
  columns take the unrounded ``beta`` (relaxation step); every other pass rounds;
- columns with ``S_jj = 0`` are just rounded; optional act-order visits columns by decreasing ``S_jj``.
One addition: the rounded iterate with the lowest objective is returned (the objective of each rounded
pass is free, ``f = <W - W_hat, G>``); with the default schedule this is almost always the last pass.
"""
from __future__ import annotations

import torch

from .base import LayerStats, Method, QuantizedWeight, register, weight_from_grid
from .cd_kernel import cd_block
from .dtypes import DataType, get_dtype
from .gptq import gptq_quantize_weight
from .grid import GridParams, Rounder, compute_grid_params, expand_groups, round_to_grid
from .spec import Option, QuantSpec

__all__ = ["quantease_quantize_weight", "quantease_quantize", "is_rounding_pass", "CDState"]

CD_BLOCK = 128


def is_rounding_pass(it: int, n_iter: int) -> bool:
    """Reference schedule: relax (no rounding) on ``it % 3 == 1`` while ``it <= 25``, never on the last pass."""
    return it % 3 != 1 or it == n_iter - 1 or it > 25


class CDState:
    """Column grid and ``S`` in the order columns are visited, transposed for contiguous column access.

    Args:
        params: the fixed grid (original column order).
        S: ``(in, in)``; perm: visiting order (``None`` = natural).
    """

    def __init__(self, params: GridParams, S: torch.Tensor, perm: torch.Tensor | None, out: int) -> None:
        cols = S.shape[0]
        self.perm = perm
        scale = expand_groups(params.scales, params.group_size, cols)  # (out, in)
        zp = None if params.zero_points is None else expand_groups(params.zero_points, params.group_size, cols)
        if perm is not None:
            scale, S = scale[:, perm], S[perm][:, perm]
            zp = None if zp is None else zp[:, perm]
        self.scale_t = scale.t().contiguous()  # (in, out): row j = column j's scales
        self.zp_t = None if zp is None else zp.t().contiguous()
        self.S = S.contiguous()
        self.diag = torch.diagonal(self.S).clone()
        self.positive = (self.diag > 0).tolist()
        self._np: dict = {}
        self.rounder: Rounder = params.rounder

    def round(self, j: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and grid values of the nearest grid points to ``u`` (out,) in column ``j``."""
        return round_to_grid(u, self.rounder, self.scale_t[j], None if self.zp_t is None else self.zp_t[j])

    def _kernel_args(self, dtype: torch.dtype):
        if dtype not in self._np:
            r = self.rounder
            uniform = r.uniform is not None
            g0, step, last = r.uniform if uniform else (0.0, 1.0, r.grid.numel() - 1)
            grid, mid = r._by_dtype[dtype]
            has_zp = self.zp_t is not None
            self._np[dtype] = dict(
                S=self.S.numpy(), diag=self.diag.numpy(), scale=self.scale_t.numpy(),
                zp=(self.zp_t if has_zp else self.scale_t[:1, :1]).numpy(), has_zp=has_zp,
                uniform=uniform, g0=float(g0), step=float(step), last=int(last), grid=grid.numpy(),
                mid=mid.numpy(), grid_codes=r.codes.contiguous().numpy(),
            )
        return self._np[dtype]

    def cd_pass(self, What_t: torch.Tensor, G_t: torch.Tensor, codes_t: torch.Tensor, rounding: bool,
                block: int = CD_BLOCK, compiled: bool = True) -> None:
        """One sweep over all columns, in place.

        Args:
            What_t: ``(in, out)`` current ``W_hat^T``. G_t: ``(in, out)`` ``((T - W_hat) S)^T`` for the
                current iterate (``T`` = the target, ``W`` or ``W - outliers``); consumed.
            codes_t: ``(in, out)`` long, written on rounding passes.
            compiled: use the numba block kernel (``cd_kernel.cd_block``); ``False`` runs the torch
                reference below, which does the same arithmetic column by column.
        """
        S = self.S
        cols = S.shape[0]
        kargs = self._kernel_args(What_t.dtype) if compiled else None
        for b0 in range(0, cols, block):
            b1 = min(b0 + block, cols)
            delta = torch.empty(b1 - b0, What_t.shape[1], dtype=What_t.dtype)
            if compiled:
                cd_block(What_t.numpy(), G_t.numpy(), codes_t.numpy(), kargs["S"], kargs["diag"], b0, b1,
                         kargs["scale"], kargs["zp"], kargs["has_zp"], rounding, kargs["uniform"], kargs["g0"],
                         kargs["step"], kargs["last"], kargs["grid"], kargs["mid"], kargs["grid_codes"],
                         delta.numpy())
            else:
                self._block_reference(What_t, G_t, codes_t, rounding, b0, b1, delta)
            if b1 < cols:
                G_t[b1:] -= S[b1:, b0:b1] @ delta

    def _block_reference(self, What_t, G_t, codes_t, rounding, b0, b1, delta) -> None:
        S, positive = self.S, self.positive
        for j in range(b0, b1):
            w_old = What_t[j]
            u = w_old + G_t[j] / self.diag[j] if positive[j] else w_old
            if rounding or not positive[j]:
                c, u = self.round(j, u)
                codes_t[j] = c
            d = u - w_old
            What_t[j] = u
            delta[j - b0] = d
            if j + 1 < b1:
                G_t[j + 1:b1] -= S[j, j + 1:b1, None] * d[None, :]


def quantease_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    dtype: DataType,
    group_size: int | None,
    symmetric: bool = True,
    *,
    n_iter: int = 30,
    gptq_init: bool = False,
    act_order: bool = False,
    params: GridParams | None = None,
) -> tuple[torch.Tensor, GridParams, torch.Tensor, dict]:
    """QuantEase coordinate descent for one layer.

    Args:
        W: ``(out, in)`` float32; H: ``(in, in)`` ``S = sum x x^T``.
        n_iter: passes over the columns.
        gptq_init: start from the GPTQ solution and keep GPTQ's grid.
        act_order: visit columns by decreasing ``S_jj``.
        params: fixed grid to use (default: from the original ``W``).
    Returns:
        codes ``(out, in)`` long, ``GridParams``, ``W_hat (out, in)``, info (objective per rounded pass).
    """
    fdt = torch.float64 if W.dtype == torch.float64 else torch.float32  # float64 only for tests
    W = W.detach().to(fdt)
    S = H.detach().to(fdt)
    out, cols = W.shape
    if gptq_init:
        codes0, params, What = gptq_quantize_weight(W, S, dtype, group_size, symmetric)
    else:
        if params is None:
            params = compute_grid_params(W, dtype, group_size, symmetric)
        What, codes0 = W.clone(), torch.zeros(out, cols, dtype=torch.long)
    perm = torch.argsort(torch.diagonal(S), descending=True) if act_order else None
    state = CDState(params, S, perm, out)
    Wp = W if perm is None else W[:, perm]
    What_t = (What if perm is None else What[:, perm]).t().contiguous()  # (in, out)
    codes_t = (codes0 if perm is None else codes0[:, perm]).t().contiguous()
    P_t = state.S @ Wp.t()  # ((W S)^T) = S W^T  (S symmetric)

    objectives: list[float | None] = []
    best = (float("inf"), None, None, -1)
    rounded_prev = gptq_init
    for it in range(n_iter + 1):
        G_t = P_t - state.S @ What_t  # ((W - W_hat) S)^T
        if rounded_prev:
            f = float(((Wp.t() - What_t) * G_t).sum())
            objectives.append(f)
            if f < best[0]:
                best = (f, What_t.clone(), codes_t.clone(), it - 1)
        elif it > 0:
            objectives.append(None)
        if it == n_iter:
            break
        rounded_prev = is_rounding_pass(it, n_iter)
        state.cd_pass(What_t, G_t, codes_t, rounded_prev)

    _, What_t, codes_t, best_pass = best
    What, codes = What_t.t(), codes_t.t()
    if perm is not None:
        inv = torch.argsort(perm)
        What, codes = What[:, inv], codes[:, inv]
    info = {"objective_per_pass": objectives, "best_pass": best_pass, "n_iter": n_iter}
    return codes.contiguous(), params, What.contiguous(), info


def quantease_quantize(W: torch.Tensor, spec: QuantSpec, stats: LayerStats) -> QuantizedWeight:
    """Registered entry point (options ``it``, ``winit``, ``act``); starts from GPTQ unless ``winit``."""
    codes, params, _, info = quantease_quantize_weight(
        W, stats.H, get_dtype(spec.dtype), spec.group_size, spec.symmetric,
        n_iter=spec.option("it"), gptq_init=not spec.option("winit"), act_order=spec.option("act"),
    )
    return weight_from_grid(codes, params, spec, info=info)


register(Method(
    name="quantease",
    description="QuantEase: cyclic coordinate descent on ||WX - W_hat X||^2 with closed-form per-column "
                "rounding (no inverse), started from GPTQ (option winit: from W)",
    requires=frozenset({"hessian"}),
    fn=quantease_quantize,
    options=(
        Option("it", int, 30, "number of coordinate-descent passes", max_value=10_000),
        Option("winit", bool, False, "start from W with a grid fixed from W (the paper's basic algorithm) "
                                     "instead of from the GPTQ solution and its grid"),
        Option("act", bool, False, "visit columns by decreasing H_jj"),
    ),
))
