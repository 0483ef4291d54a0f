"""Sensitivity-weighted non-uniform codebooks ("lens of perturbation", Gong et al. 2024).

Each output row gets its own codebook of ``2**b`` values (``b`` = the bits of the spec's int/nf type),
fitted by weighted 1-D k-means (Lloyd) to the row's weights so that levels are dense where the loss is
sensitive and the weights are many:

    minimize  sum_ij omega_ij (W_ij - s_ig c_i[code_ij])^2,   omega_ij = diag(H)_j   (or Fisher_ij)

which is the diagonal (second-order) approximation of the layer loss. Weights are first divided by a
per-row or per-group fp16 scale ``s`` (the spec's group, symmetric absmax rule of ``grid.py``) so that one
row codebook ``c_i`` (unit scale, stored fp16) serves every group of the row:
``W_hat = table[o, code] * scales[o, g]``, the per-row-table form of INTERFACES.md. The codebook starts
at the data type's own grid (so iteration 0 is RTN) and Lloyd steps never increase the weighted error;
empty clusters keep their previous value.

Cost: ``b`` bits per weight + fp16 scales + ``16 * 2**b / in`` bits for the row codebook.
"""
from __future__ import annotations

import torch

from .base import LayerStats, Method, QuantizedWeight, register
from .dtypes import DataType, get_dtype
from .grid import Rounder, compute_grid_params, expand_groups
from .spec import Option, QuantSpec

__all__ = ["fit_row_codebooks", "nonuniform_quantize"]


def fit_row_codebooks(
    Wn: torch.Tensor, omega: torch.Tensor, init: torch.Tensor, n_iter: int = 25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D k-means per row.

    Args:
        Wn: ``(out, in)`` values to encode (unit scale). omega: ``(out, in)`` non-negative weights.
        init: ``(K,)`` or ``(out, K)`` sorted initial codebook.
    Returns:
        codebooks ``(out, K)`` sorted, codes ``(out, in)`` long (nearest-codebook indices).
    """
    out = Wn.shape[0]
    C = (init if init.dim() == 2 else init.expand(out, -1)).to(torch.float32).clone()
    K = C.shape[1]
    idx = Rounder(C).index(Wn)
    for _ in range(n_iter):
        num = torch.zeros(out, K).scatter_add_(1, idx, omega * Wn)
        den = torch.zeros(out, K).scatter_add_(1, idx, omega)
        C = torch.where(den > 0, num / den.clamp_min(1e-30), C)
        C, _ = torch.sort(C, dim=1)
        new_idx = Rounder(C).index(Wn)
        if torch.equal(new_idx, idx):
            break
        idx = new_idx
    C = C.to(torch.float16).to(torch.float32)  # stored as fp16
    C, _ = torch.sort(C, dim=1)
    return C, Rounder(C).index(Wn)


def nonuniform_quantize(W: torch.Tensor, spec: QuantSpec, stats: LayerStats) -> QuantizedWeight:
    """Registered entry point (option ``it``: Lloyd iterations)."""
    dtype: DataType = get_dtype(spec.dtype)
    out, cols = W.shape
    params = compute_grid_params(W, dtype, spec.group_size, symmetric=True)
    scale = expand_groups(params.scales, params.group_size, cols)  # (out, in)
    if stats.fisher is not None:
        sens = stats.fisher.to(torch.float32)
    else:
        sens = torch.diagonal(stats.H).to(torch.float32).expand(out, -1)
    sens = sens.clamp_min(0) + 1e-8 * sens.clamp_min(0).mean().clamp_min(1e-30)
    omega = sens * scale**2  # error in W units = scale * (Wn - c)
    Wn = W / scale
    init = torch.tensor(dtype.grid, dtype=torch.float32)
    table, codes = fit_row_codebooks(Wn, omega, init, spec.option("it"))
    return QuantizedWeight(
        codes=codes.to(torch.uint8), scales=params.scales, offsets=None, table=table.contiguous(),
        group_size=params.group_size, outliers=None, dtype=dtype, spec=spec,
        info={"sensitivity": "fisher" if stats.fisher is not None else "diag(H)"},
    )


def _codebook_bits(spec: QuantSpec, in_features: int | None) -> float:
    if in_features is None:
        raise ValueError(f"{spec}: the per-row codebook costs 16 * 2**bits / in_features bits per weight; "
                         f"pass in_features")
    return 16.0 * 2 ** get_dtype(spec.dtype).bits / in_features


register(Method(
    name="nonuniform",
    description="per-row non-uniform codebook (2**bits levels) by k-means weighted with diag(H) or the "
                "Fisher diagonal, times per-row/group fp16 scales",
    requires=frozenset({"hessian"}),
    fn=nonuniform_quantize,
    options=(Option("it", int, 25, "Lloyd (k-means) iterations", max_value=10_000),),
    dtype_families=frozenset({"int", "nf"}),
    supports_asymmetric=False,
    extra_bits=_codebook_bits,
))
