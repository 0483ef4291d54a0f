"""AWQ: activation-aware weight quantization (Lin et al. 2023), scale search only.

Per-input-channel scales ``s = act_abs_mean ** alpha`` (normalized so ``sqrt(max(s) min(s)) = 1``, as in
the reference ``auto_scale``), for ``alpha`` on the 20-point grid ``0, 0.05, ..., 0.95``. Each candidate
quantizes ``W diag(s)`` with RTN and is scored by the layer output error of the effective weight
``W_hat = Q(W diag(s)) diag(s)^-1``, computed from ``H = X X^T`` alone:
``||(W - W_hat) X||_F^2 = tr(E H E^T)``. ``alpha = 0`` (``s = 1``) is plain RTN, so the chosen
candidate is never worse than RTN on this objective.

The reference scores candidates on the output of the whole block and shares ``s`` between layers that
read the same input, folding ``1/s`` into the previous op; here each layer is scored on its own output and
``s`` is returned as ``QuantizedWeight.input_scale`` (the packed layer computes ``(x / s) @ W_q^T``).
Option ``gptq``: after the search, quantize ``W diag(s)`` with GPTQ on the correspondingly scaled
Hessian ``diag(1/s) H diag(1/s)`` instead of RTN. AWQ's weight-clipping search is not implemented.
"""
from __future__ import annotations

import torch

from .base import LayerStats, Method, QuantizedWeight, register, weight_from_grid
from .dtypes import DataType, get_dtype
from .gptq import gptq_quantize_weight
from .grid import dequantize, quantize_rtn
from .spec import Option, QuantSpec

__all__ = ["awq_search_scale", "awq_quantize", "ALPHA_GRID"]

ALPHA_GRID = tuple(i / 20 for i in range(20))


def _trace_error(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    return ((E @ H) * E).sum()


def awq_search_scale(
    W: torch.Tensor,
    H: torch.Tensor,
    act_abs_mean: torch.Tensor,
    dtype: DataType,
    group_size: int | None,
    symmetric: bool = True,
    alphas: tuple[float, ...] = ALPHA_GRID,
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of the AWQ exponent.

    Args:
        W: ``(out, in)``; H: ``(in, in)``; act_abs_mean: ``(in,)`` mean |x| per input channel.
    Returns:
        (best scale ``s`` ``(in,)``, best alpha, layer error of every alpha in order).
    """
    x_max = act_abs_mean.to(torch.float32)
    errors: list[float] = []
    best = (None, 0.0, float("inf"))
    for alpha in alphas:
        s = x_max.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = s.to(torch.float16).to(torch.float32)  # stored as fp16 wherever it ends up
        codes, p = quantize_rtn(W * s[None, :], dtype, group_size, symmetric)
        W_hat = dequantize(codes, p.table, p.scales, p.offsets, p.group_size) / s[None, :]
        err = float(_trace_error(W - W_hat, H))
        errors.append(err)
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], errors


def awq_quantize(W: torch.Tensor, spec: QuantSpec, stats: LayerStats) -> QuantizedWeight:
    """Registered entry point: AWQ scale search, then RTN (or GPTQ with option ``gptq``)."""
    dtype = get_dtype(spec.dtype)
    s, alpha, errors = awq_search_scale(W, stats.H, stats.act_abs_mean, dtype, spec.group_size, spec.symmetric)
    Ws = W * s[None, :]
    if spec.option("gptq"):
        Hs = stats.H / s[:, None] / s[None, :]
        codes, params, _ = gptq_quantize_weight(Ws, Hs, dtype, spec.group_size, spec.symmetric)
    else:
        codes, params = quantize_rtn(Ws, dtype, spec.group_size, spec.symmetric)
    info = {"alpha": alpha, "search_errors": errors}
    return weight_from_grid(codes, params, spec, input_scale=s.contiguous(), info=info)


register(Method(
    name="awq",
    description="AWQ: per-input-channel scale act_abs_mean**alpha searched on the layer output error, "
                "then RTN (or GPTQ) of the scaled weights",
    requires=frozenset({"hessian", "act_abs_mean"}),
    fn=awq_quantize,
    options=(Option("gptq", bool, False, "quantize the scaled weights with GPTQ instead of RTN"),),
))
