"""Round to nearest: every weight to the nearest grid point of its (row, group) scale."""
from __future__ import annotations

import torch

from .base import LayerStats, Method, QuantizedWeight, register, weight_from_grid
from .dtypes import get_dtype
from .grid import quantize_rtn
from .spec import QuantSpec

__all__ = ["rtn_quantize"]


def rtn_quantize(W: torch.Tensor, spec: QuantSpec, stats: LayerStats | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``W (out, in)``; needs no calibration statistics."""
    codes, params = quantize_rtn(W, get_dtype(spec.dtype), spec.group_size, spec.symmetric)
    return weight_from_grid(codes, params, spec)


register(Method(
    name="rtn",
    description="round to nearest on the per-row/group (or MX block) grid; no calibration data",
    requires=frozenset(),
    fn=rtn_quantize,
))
