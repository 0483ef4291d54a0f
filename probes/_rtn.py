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

from advisor.models.errors import AdvisorError
from advisor.probes._util import LayerInfo, spec_key

# Group sizes compared by ``sqnr`` (None = one scale per output channel); MX types have a fixed block.
SQNR_GROUP_SIZES: tuple[int | None, ...] = (None, 32, 64, 128)

# The group size each data type is normally used with (the candidate grid's choice): per channel at
# 6-8 bits, g128 for int3/int4/fp4, g64 for the normal-float codebooks and int2; MX: its block of 32.
_DEFAULT_GROUP = {"int2": 64, "int3": 128, "int4": 128, "fp4_e2m1": 128, "nf4": 64, "nf3": 64}


def dtype_names() -> list[str]:
    from advisor.quantizers import DTYPES

    return list(DTYPES)


def default_group(dtype: str) -> int | None:
    """The group size ``second_order`` uses for ``dtype`` by default (None = per channel or MX block)."""
    from advisor.quantizers import get_dtype

    if get_dtype(dtype).block_size is not None:
        return None
    return _DEFAULT_GROUP.get(dtype)


def configs(dtypes: list[str] | None = None, all_group_sizes: bool = True) -> list[tuple[str, int | None, str]]:
    """(dtype, group_size, feature key) for every data type and, optionally, every ``SQNR_GROUP_SIZES``."""
    from advisor.quantizers import get_dtype

    out = []
    for name in dtypes or dtype_names():
        dt = get_dtype(name)
        if dt.block_size is not None:
            out.append((name, None, spec_key(name, None, dt.block_size)))
            continue
        for g in (SQNR_GROUP_SIZES if all_group_sizes else (default_group(name),)):
            out.append((name, g, spec_key(name, g)))
    return out


def parse_key(key: str) -> tuple[str, int | None, bool]:
    """(dtype, group size, symmetric) of a format key: ``int4_g128``, ``int8_pc``, ``mxfp4``,
    ``int3_g256_asym``; any group size, the canonical spelling only (``spec_key`` is its inverse).

    Raises:
        AdvisorError: a key that names no format, naming what keys look like.
    """
    from advisor.quantizers import QuantSpec, get_dtype

    body, symmetric = (key[:-5], False) if isinstance(key, str) and key.endswith("_asym") else (key, True)
    try:
        if isinstance(body, str) and body in dtype_names() and get_dtype(body).block_size is not None:
            dtype, group = body, None
        else:
            dtype, _, tail = str(body).rpartition("_")
            if tail == "pc":
                group = None
            elif tail[:1] == "g" and tail[1:].isdigit():
                group = int(tail[1:])
            else:
                raise ValueError("no group")
        spec = QuantSpec("rtn", dtype, group, symmetric)
        if spec_key(spec.dtype, spec.group_size, get_dtype(dtype).block_size, spec.symmetric) != key:
            raise ValueError("not canonical")
    except ValueError:
        raise AdvisorError(f"unknown format key {key!r}; keys look like int4_g128, int8_pc, mxfp4, int3_g256_asym "
                           f"(data types: {', '.join(dtype_names())})") from None
    return dtype, group, symmetric


def is_symmetric_key(key: str) -> bool:
    """Whether format ``key`` is symmetric (no ``_asym`` suffix)."""
    return not key.endswith("_asym")


def format_table(keys: list[str] | None) -> list[tuple[str, int | None, str]]:
    """(dtype, group size, key) of the requested feature keys (None: every data type at its default group).

    Any format the quantizers accept has a key (``parse_key``), on the ``sqnr`` grid or not; a key's
    symmetry is ``is_symmetric_key(key)``.

    Raises:
        AdvisorError: a key that names no format.
    """
    if keys is None:
        return configs(None, all_group_sizes=False)
    out = []
    for k in dict.fromkeys(keys):
        dtype, group, _ = parse_key(k)
        out.append((dtype, group, k))
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


def rtn_weight_reference(W: torch.Tensor, dtype: str, group_size: int | None,
                         symmetric: bool = True) -> torch.Tensor:
    """``Q(W)``: the round-to-nearest weights, float32 (rows, in), through the quantizers' RTN method
    (codes, then ``QuantizedWeight.dequantize``)."""
    from advisor.quantizers import LayerStats, QuantSpec, get_method

    spec = QuantSpec("rtn", dtype, group_size, symmetric)
    return get_method("rtn").quantize(W.detach().float(), spec, LayerStats()).dequantize()


def rtn_weight(W: torch.Tensor, dtype: str, group_size: int | None, symmetric: bool = True) -> torch.Tensor:
    """``Q(W)`` as ``rtn_weight_reference``, bit for bit (tested), without its per-weight detours.

    The reference expands each group's scale to a full ``(out, in)`` tensor by indexing, rounds to
    int64 codes and dequantizes them through the table. Here the scales broadcast over a
    ``(out, groups, group)`` view and the rounder's grid values are used directly: the same division,
    the same nearest grid value, the same product. A width that is not a multiple of the group (SmolLM2's
    576 at group 128) has its last, shorter group done the same way on its own; asymmetric formats (zero
    points) take the reference.
    """
    from advisor.quantizers import get_dtype
    from advisor.quantizers.grid import compute_grid_params

    if not symmetric:
        return rtn_weight_reference(W, dtype, group_size, symmetric=False)
    dt = get_dtype(dtype)
    Wf = W.detach().float()
    out, cols = Wf.shape
    params = compute_grid_params(Wf, dt, group_size, symmetric=True)
    g = params.group_size
    if params.offsets is not None or params.rounder.grid.dim() != 1:
        return rtn_weight_reference(W, dtype, group_size)
    full = cols // g
    s = params.scales[:, :full].unsqueeze(-1)  # (out, full groups, 1)
    main = (params.rounder.values(Wf[:, : full * g].reshape(out, full, g) / s) * s).view(out, full * g)
    if full * g == cols:
        return main
    res = torch.empty_like(Wf)
    res[:, : full * g] = main
    s = params.scales[:, full:]  # (out, 1): the last, shorter group
    res[:, full * g :] = params.rounder.values(Wf[:, full * g :] / s) * s
    return res


def rtn_error(W: torch.Tensor, dtype: str, group_size: int | None, symmetric: bool = True) -> torch.Tensor:
    """``Q(W) - W`` for round-to-nearest, float32 (rows, in), through the quantizers' RTN method."""
    return rtn_weight(W, dtype, group_size, symmetric) - W.detach().float()


def layer_rows(layers: list[LayerInfo], max_elements: int | None, min_rows: int, seed: int) -> list[torch.Tensor]:
    """The sampled row indices of every layer (same fraction of each; see module docstring)."""
    fraction = row_fraction(layers, max_elements)
    return [sampled_rows(i, li.module.out_features, fraction, min_rows, seed) for i, li in enumerate(layers)]


def sampled_rtn_errors(layers: list[LayerInfo], rows: list[torch.Tensor], dtype: str,
                       group_size: int | None, symmetric: bool = True) -> list[torch.Tensor]:
    """RTN errors of the sampled rows of every layer, (rows_l, in_l) each.

    Rows of all layers with the same input width are stacked and quantized in one call (one call per
    width instead of one per layer: the cost is per call on small matrices); since every format
    scales within a row, the result equals ``rtn_error`` layer by layer (tested).
    """
    by_width: dict[int, list[int]] = {}
    for i, li in enumerate(layers):
        by_width.setdefault(li.module.in_features, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(layers)
    for idx in by_width.values():
        W = torch.cat([layers[i].module.weight.detach()[rows[i]].float().cpu() for i in idx])
        E = rtn_error(W, dtype, group_size, symmetric)
        for i, part in zip(idx, torch.split(E, [int(rows[i].numel()) for i in idx])):
            out[i] = part
    return out  # type: ignore[return-value]


def cached_rtn_errors(cache: dict, layers: list[LayerInfo], max_elements: int | None, min_rows: int, seed: int,
                      dtype: str, group_size: int | None, symmetric: bool = True
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(rows, errors) per layer, memoized in ``cache`` for the probes of one run (``sqnr``, ``second_order``)."""
    rows_key = ("rtn_rows", max_elements, min_rows, seed)
    if rows_key not in cache:
        cache[rows_key] = layer_rows(layers, max_elements, min_rows, seed)
    rows = cache[rows_key]
    key = ("rtn_errors", max_elements, min_rows, seed, dtype, group_size, symmetric)
    if key not in cache:
        cache[key] = sampled_rtn_errors(layers, rows, dtype, group_size, symmetric)
    return rows, cache[key]
