"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022), with the block-format generalisation of
Sharify et al. 2024 ("enhanced GPTQ", Algorithm 1).

Notation (the reference ``gptq.py`` of IST-DASLab): ``W (out, in)`` weights, ``H = X X^T (in, in)``,
``Hinv`` = upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``Hinv = U^T U``). Columns are quantized
left to right; the error of column ``j`` is spread over the not-yet-quantized columns with row ``j`` of
``U``: ``W[:, j+1:] -= (w_j - q_j) / U_jj * U[j, j+1:]``. Lazy batches: updates inside a block of 128
columns are applied eagerly, the rest of the matrix is updated once per block with one GEMM.

- damping: ``damp * mean(diag H)`` added to the diagonal (default 1 %); dead inputs (``H_jj = 0``) get
  ``H_jj = 1`` and their weights are zeroed, as in the reference.
- groups: a group's scale is computed from the *current* (error-updated) weights when its first column
  is reached, as in the reference. (Where a group starts inside a lazy block, the reference reads the
  not-yet-updated copy; we use the current values, including pending lazy updates for columns beyond
  the block. With groups of 128 and blocks of 128 both are the same.)
- act-order: columns are visited by decreasing ``H_jj``. With groups, the groups are the reference's
  "static groups" (fixed from the original weights, in original column order) so that
  ``scales[o, i // group_size]`` still indexes them.
- MX (block) formats: a whole micro-block of 32 columns sharing one E8M0 scale is quantized at once from
  its current values; its error ``E`` (out, 32) is propagated with ``Err = E U_SS^-1`` (a triangular
  solve) and ``W_R -= Err U_SR``, which is the optimal (OBS) compensation for a set ``S`` of fixed
  columns. For a single column this is the usual ``(w - q) / U_jj``.
"""
from __future__ import annotations

import torch

from .base import LayerStats, Method, QuantizedWeight, register, weight_from_grid
from .dtypes import DataType, get_dtype
from .grid import GridParams, compute_grid_params, effective_group_size, n_groups, round_to_grid, rounder_for
from .spec import Option, QuantSpec

__all__ = ["gptq_quantize_weight", "gptq_quantize", "damped_inverse_cholesky"]

LAZY_BLOCK = 128


def damped_inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``(in, in)`` float32)."""
    H = H.clone()
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp * torch.mean(torch.diag(H))
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def gptq_quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    dtype: DataType,
    group_size: int | None,
    symmetric: bool = True,
    *,
    damp: float = 0.01,
    block_size: int = LAZY_BLOCK,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, GridParams, torch.Tensor]:
    """GPTQ of one layer.

    Args:
        W: ``(out, in)`` float32 weights. H: ``(in, in)`` float32 ``sum x x^T`` (any positive multiple).
        dtype, group_size, symmetric: the grid (``group_size=None``: per output channel).
        damp: relative damping (fraction of the mean diagonal).
        block_size: lazy-batch width (a multiple of the MX block for MX types).
        act_order: visit columns by decreasing ``H_jj``.
        scale_dtype: ``torch.float16`` (stored) or ``torch.float32`` (to reproduce the reference).
    Returns:
        codes ``(out, in)`` long, ``GridParams`` (scales ``(out, n_groups)``), dequantized ``Q (out, in)``.
    """
    fdt = torch.float64 if W.dtype == torch.float64 else torch.float32  # float64 only for tests
    W = W.detach().to(fdt).clone()
    H = H.detach().to(fdt).clone()
    out, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    g = effective_group_size(dtype, group_size, cols)
    unit = dtype.block_size or 1  # columns that share one scale and are rounded together
    if unit > 1:
        if act_order:
            raise ValueError(f"act-order is not supported for MX type {dtype.name}: its blocks of "
                             f"{unit} columns must stay contiguous")
        block_size = max(unit, block_size // unit * unit)
    static = act_order and g < cols

    ng = n_groups(cols, g)
    scales = torch.zeros(out, ng, dtype=fdt)
    zps = None if symmetric or unit > 1 else torch.zeros(out, ng, dtype=fdt)
    group_of = torch.arange(cols) // g
    if static:
        params = compute_grid_params(W, dtype, g, symmetric, scale_dtype=scale_dtype)
        scales, zps = params.scales.clone(), None if params.zero_points is None else params.zero_points.clone()

    perm = torch.arange(cols)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        group_of = group_of[perm]
    group_of = group_of.tolist()

    Hinv = damped_inverse_cholesky(H, damp)
    rounder = rounder_for(dtype, symmetric or unit > 1)
    codes = torch.zeros(out, cols, dtype=torch.long)
    Q = torch.zeros_like(W)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        i = 0
        while i < count:
            col = i1 + i
            width = min(unit, count - i)
            if unit > 1:
                # MX micro-block: its own scale from its current values
                p = compute_grid_params(W1[:, i:i + width], dtype, None, symmetric, scale_dtype=scale_dtype)
                scales[:, col // g] = p.scales[:, 0]
                s, zp = p.scales, None
            else:
                if not static and col % g == 0:
                    cur = _current_group(W, W1, Err1, Hinv, i1, i2, i, col, min(col + g, cols))
                    p = compute_grid_params(cur, dtype, None, symmetric, scale_dtype=scale_dtype)
                    scales[:, col // g] = p.scales[:, 0]
                    if zps is not None:
                        zps[:, col // g] = p.zero_points[:, 0]
                gi = group_of[col]
                s = scales[:, gi:gi + 1]
                zp = None if zps is None else zps[:, gi:gi + 1]
            w = W1[:, i:i + width]  # (out, width)
            c, q = round_to_grid(w, rounder, s, zp)
            codes[:, col:col + width] = c
            Q[:, col:col + width] = q
            if width == 1:
                err = (w - q) / Hinv1[i, i]
            else:
                err = torch.linalg.solve_triangular(Hinv1[i:i + width, i:i + width], w - q, upper=True, left=False)
            W1[:, i + width:] -= err @ Hinv1[i:i + width, i + width:]
            Err1[:, i:i + width] = err
            i += width
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
    params = GridParams(scales, zps, g, dtype, symmetric or unit > 1)
    return codes, params, Q


def _current_group(W, W1, Err1, Hinv, i1, i2, i, col, stop) -> torch.Tensor:
    """Current values of columns ``col:stop``: in-block columns from ``W1``; columns past the lazy block
    from ``W`` minus the updates still pending from this block's first ``i`` columns."""
    inside = W1[:, i:i + (min(stop, i2) - col)]
    if stop <= i2:
        return inside
    beyond = W[:, i2:stop] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:stop]
    return torch.cat([inside, beyond], dim=1)


def gptq_quantize(W: torch.Tensor, spec: QuantSpec, stats: LayerStats) -> QuantizedWeight:
    """Registered entry point: GPTQ with the spec's grid and options (``act``, ``damp``)."""
    codes, params, _ = gptq_quantize_weight(
        W, stats.H, get_dtype(spec.dtype), spec.group_size, spec.symmetric,
        damp=spec.option("damp"), act_order=spec.option("act"),
    )
    return weight_from_grid(codes, params, spec)


def _validate(spec: QuantSpec, dtype: DataType) -> None:
    if dtype.block_size is not None and spec.option("act"):
        raise ValueError(f"{spec}: act-order is not supported for MX type {dtype.name} (its blocks of "
                         f"{dtype.block_size} columns must stay contiguous); drop ':act'")


register(Method(
    name="gptq",
    description="GPTQ: column-by-column rounding with inverse-Hessian error compensation (lazy blocks, "
                "groups, act-order; MX blocks rounded jointly)",
    requires=frozenset({"hessian"}),
    fn=gptq_quantize,
    options=(
        Option("act", bool, False, "act-order: visit columns by decreasing H_jj (not for MX types)"),
        Option("damp", float, 0.01, "diagonal damping as a fraction of mean(diag H)", max_value=10.0),
    ),
    validate=_validate,
))
