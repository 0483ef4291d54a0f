"""Round-to-nearest errors of sampled weight rows, shared by ``sqnr`` and ``second_order``.

Every format here scales along the input dimension (per row, per group of a row, or per MX block of
a row), so the RTN error of a row depends only on that row. Quantizing a seeded random subset of rows
of each layer therefore gives *exact* errors for those rows, and sums over the subset scaled by
``out / n_rows`` are unbiased estimates of whole-layer sums. The subset is the same fraction of every
layer (at least ``min_rows`` rows), so parameter-weighted aggregates keep their weights.
"""
from __future__ import annotations

import math
import zlib

import torch

from probes._util import LayerInfo, spec_key

# Group sizes compared by ``sqnr`` (None = one scale per output channel); MX types have a fixed block.
SQNR_GROUP_SIZES: tuple[int | None, ...] = (None, 32, 64, 128)

# The group size each data type is normally used with (the candidate grid's choice): per channel at
# 6-8 bits, g128 for int3/int4/fp4, g64 for the normal-float codebooks and int2; MX: its block of 32.
_DEFAULT_GROUP = {"int2": 64, "int3": 128, "int4": 128, "fp4_e2m1": 128, "nf4": 64, "nf3": 64}


def dtype_names() -> list[str]:
    from quantizers import DTYPES

    return list(DTYPES)


def default_group(dtype: str) -> int | None:
    """The group size ``second_order`` uses for ``dtype`` by default (None = per channel or MX block)."""
    from quantizers import get_dtype

    if get_dtype(dtype).block_size is not None:
        return None
    return _DEFAULT_GROUP.get(dtype)


def configs(dtypes: list[str] | None = None, all_group_sizes: bool = True) -> list[tuple[str, int | None, str]]:
    """(dtype, group_size, feature key) for every data type and, optionally, every ``SQNR_GROUP_SIZES``."""
    from quantizers import get_dtype

    out = []
    for name in dtypes or dtype_names():
        dt = get_dtype(name)
        if dt.block_size is not None:
            out.append((name, None, spec_key(name, None, dt.block_size)))
            continue
        for g in (SQNR_GROUP_SIZES if all_group_sizes else (default_group(name),)):
            out.append((name, g, spec_key(name, g)))
    return out


def sampled_rows(layer_index: int, out_features: int, fraction: float, min_rows: int, seed: int) -> torch.Tensor:
    """Sorted indices of the rows of one layer to quantize (all rows when ``fraction >= 1``)."""
    n = min(out_features, max(min_rows, math.ceil(fraction * out_features)))
    if n >= out_features:
        return torch.arange(out_features)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{layer_index}".encode()))
    return torch.randperm(out_features, generator=gen)[:n].sort().values


def row_fraction(layers: list[LayerInfo], max_elements: int | None) -> float:
    total = sum(li.n_params for li in layers)
    if not max_elements or max_elements >= total:
        return 1.0
    return max_elements / total


def rtn_error(W: torch.Tensor, dtype: str, group_size: int | None) -> torch.Tensor:
    """``Q(W) - W`` for round-to-nearest, float32 (rows, in), through the quantizers' RTN method."""
    from quantizers import LayerStats, QuantSpec, get_method

    spec = QuantSpec("rtn", dtype, group_size)
    W = W.detach().float()
    return get_method("rtn").quantize(W, spec, LayerStats()).dequantize() - W


def cached_rtn_error(cache: dict, li: LayerInfo, layer_index: int, rows: torch.Tensor, dtype: str,
                     group_size: int | None, seed: int) -> torch.Tensor:
    """``rtn_error`` of the sampled rows of one layer, memoized in ``cache`` for the probes of one run."""
    key = ("rtn_error", li.name, dtype, group_size, int(rows.numel()), seed)
    if key not in cache:
        cache[key] = rtn_error(li.module.weight.detach()[rows], dtype, group_size)
    return cache[key]
