"""The candidate grid (data type x method x group size) and its cost model.

Cost of a candidate on a given model:
- ``bits_per_weight``: exact storage bits of the quantized linear layers (codes + scales + zeros +
  outliers; :meth:`QuantSpec.bits_per_weight` with the model's layer widths);
- ``bytes``: those layers at that rate, plus every other parameter (embeddings, norms, head) at the
  bytes advisor's outputs store it in (the narrowest of bf16/fp16/fp32 that holds it exactly:
  ``advisor.models.saving.storage_dtype``; 16 bits when only counts are known);
- ``relative_speed``: decode (batch 1) speed of the packed kernels relative to a bf16 ``nn.Linear``,
  measured on this machine by :mod:`advisor.kernel_speed` (a short calibration, cached per CPU
  model, kernel ISA path and version); a format that was not measured takes the median measured
  speed of formats with the same code bits (nf3 that of int3, mxfp6 that of fp6), and with none of
  those (or no calibration at all) the memory-bound estimate 16 / bits, marked
  ``speed_source="estimate"``.
Candidates are ranked by bytes, then by speed (faster first): the deployment cost. Among candidates of
equal deployment cost the better predicted quality comes first (:func:`order_by_cost_then_quality`): the
solver's compute is a one-time cost already paid when the model ships, so it breaks a tie only between
predictions within ``QUALITY_TIE_NATS`` of each other (below what the default protocol can measure).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

# About 40 specs from ~2.2 to ~8.1 bits per weight. Methods are paired with the formats where
# they are known to matter: GPTQ/AWQ/QuantEase at 2-4 bits; RTN is enough at 6-8 bits.
DEFAULT_SPECS: tuple[str, ...] = (
    # 8 bits
    "rtn:int8", "rtn:fp8_e4m3", "rtn:fp8_e5m2", "rtn:mxint8", "rtn:mxfp8_e4m3",
    # 6 bits
    "rtn:fp6_e3m2", "rtn:fp6_e2m3", "rtn:mxfp6_e3m2", "rtn:mxfp6_e2m3",
    # 4 bits
    "rtn:int4:g128", "rtn:int4:g64", "rtn:int4:g32", "gptq:int4:g128", "gptq:int4:g64", "gptq:int4",
    "awq:int4:g128", "quantease:int4:g128", "rtn:nf4:g64", "rtn:fp4_e2m1:g128", "rtn:mxfp4", "gptq:mxfp4",
    "rtn:mxint4", "gptq:mxint4", "nonuniform:int4",
    # 3 bits
    "rtn:int3:g128", "rtn:int3:g64", "gptq:int3:g128", "gptq:int3:g64", "awq:int3:g128", "quantease:int3:g128",
    "quantease-outlier:int3:g128", "rtn:nf3:g64", "nonuniform:int3",
    # 2 bits
    "gptq:int2:g64", "gptq:int2:g32", "quantease:int2:g64", "quantease-outlier:int2:g64",
)


# Group sizes deployments use, besides one scale per output channel: multiples of 8 (the packed
# kernels' fast path), from the finest common one to the coarsest. Any other positive group size is a
# valid spec too; these are the ones every format is predicted at (``all_formats``).
FORMAT_GROUP_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)


def all_formats(extra_group_sizes: Iterable[int] = ()) -> list[tuple[str, int | None]]:
    """Every (data type, group size) the kernels run: each data type per channel and at every
    ``FORMAT_GROUP_SIZES`` (and ``extra_group_sizes``); MX types at their fixed block (group None)."""
    from advisor.quantizers import DTYPES

    groups = sorted(set(FORMAT_GROUP_SIZES) | {int(g) for g in extra_group_sizes})
    out: list[tuple[str, int | None]] = []
    for name, dt in DTYPES.items():
        out += [(name, None)] if dt.block_size is not None else [(name, None)] + [(name, g) for g in groups]
    return out


def all_format_specs(method: str = "rtn") -> list[str]:
    """``method`` at every format of ``all_formats``, symmetric and, for integer types, asymmetric."""
    from advisor.quantizers import QuantSpec, get_dtype

    out = []
    for dtype, group in all_formats():
        for symmetric in ((True, False) if get_dtype(dtype).supports_asymmetric else (True,)):
            try:
                out.append(str(QuantSpec(method, dtype, group, symmetric)))
            except ValueError:  # the method does not take this data type or symmetry
                continue
    return out


@dataclass(frozen=True)
class Candidate:
    spec: str
    method: str
    dtype: str
    group_size: int | None
    bits_per_weight: float
    bytes: int
    relative_speed: float  # decode speed vs bf16 nn.Linear (higher is faster)
    speed_source: str = "measured"  # "measured" on this machine, or "estimate" (16 / bits)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "method": self.method, "dtype": self.dtype, "group_size": self.group_size,
                "bits_per_weight": self.bits_per_weight, "bytes": self.bytes, "relative_speed": self.relative_speed,
                "speed_source": self.speed_source}


def default_specs(methods: Iterable[str] | None = None, dtypes: Iterable[str] | None = None) -> list[str]:
    """The default grid, optionally restricted to some methods and/or data types (validated)."""
    from advisor.quantizers import QuantSpec, get_dtype, get_method

    methods = list(methods) if methods else None
    dtypes = list(dtypes) if dtypes else None
    for m in methods or []:
        get_method(m)
    for d in dtypes or []:
        get_dtype(d)
    out = []
    for s in DEFAULT_SPECS:
        spec = QuantSpec.parse(s)
        if (methods is None or spec.method in methods) and (dtypes is None or spec.dtype in dtypes):
            out.append(s)
    return out


def _kernel_speed_table() -> dict[str, float]:
    """This machine's measured speeds (calibrating once if allowed), or {} (then estimates)."""
    from advisor.kernel_speed import speeds

    return speeds().speeds


def _dtype_names() -> set[str]:
    from advisor.quantizers import DTYPES

    return set(DTYPES)


def layer_shapes(loaded) -> list[tuple[int, int]]:
    """(out, in) of every quantizable linear layer."""
    return [(layer.out_features, layer.in_features) for _, layer in loaded.adapter.linear_layers()]


def candidate(spec_str: str, shapes: list[tuple[int, int]], other_params: int,
              speed_table: dict[str, float] | None = None, other_bytes: int | None = None) -> Candidate:
    """Cost of one spec on a model with linear layers of ``shapes`` and ``other_params`` other parameters,
    stored in ``other_bytes`` (default: 16 bits each)."""
    from advisor.quantizers import QuantSpec

    spec = QuantSpec.parse(spec_str)
    n = sum(o * i for o, i in shapes)
    bits = sum(spec.bits_per_weight(i) * o * i for o, i in shapes)
    bpw = bits / n if n else float("nan")
    total_bytes = int(math.ceil(bits / 8)) + (2 * other_params if other_bytes is None else int(other_bytes))
    table = _kernel_speed_table() if speed_table is None else speed_table
    speed, source = table.get(spec.dtype), "measured"
    if speed is None:
        from advisor.quantizers import get_dtype

        bits, known = get_dtype(spec.dtype).bits, _dtype_names()
        same = sorted(v for k, v in table.items() if k in known and get_dtype(k).bits == bits)
        speed, source = (same[len(same) // 2], "measured") if same else (16.0 / max(bpw, 1e-9), "estimate")
    return Candidate(spec=str(spec), method=spec.method, dtype=spec.dtype, group_size=spec.group_size,
                     bits_per_weight=bpw, bytes=total_bytes, relative_speed=speed, speed_source=source)


# Solver compute, cheapest first: breaks a tie between candidates of equal cost and quality within noise.
METHOD_COMPUTE_RANK = {"rtn": 0, "awq": 1, "gptq": 2, "nonuniform": 3, "quantease": 4, "quantease-outlier": 5}
# Predicted dL differences below this are noise: the paired standard error of dL on the default protocol
# (20 windows of 512 tokens) is rarely below 1e-3 nats, so a smaller predicted gain cannot be verified.
QUALITY_TIE_NATS = 1e-3


def cost_key(c: Candidate) -> tuple:
    """The ranking of candidates before any prediction (lower is cheaper): bytes, speed, solver compute, name."""
    return (c.bytes, -c.relative_speed, METHOD_COMPUTE_RANK.get(c.method, 99), c.spec)


def stored_other_bytes(loaded) -> int:
    """Bytes of every parameter outside the quantizable linear layers, as advisor's outputs store them."""
    from advisor.models.saving import stored_bytes

    linear = {id(p) for _, layer in loaded.adapter.linear_layers() for p in layer.parameters()}
    return sum(stored_bytes(p.detach()) for p in loaded.model.parameters() if id(p) not in linear)


def order_by_cost_then_quality(df, quality: str = "pred_dl", tie_nats: float = QUALITY_TIE_NATS):
    """``df`` (candidate rows with ``bytes``, ``relative_speed``, ``method``, ``spec`` and a ``quality``
    column, lower is better) reordered: cheapest deployment cost first; at equal cost the better quality;
    solver compute only between qualities within ``tie_nats`` of the tier's best. Adds ``tie_break``:
    ``None`` for a candidate alone at its cost, else ``"quality"`` or ``"compute (quality within noise)"``,
    the reason it sits where it does among its equal-cost peers."""
    import pandas as pd

    rows = []
    for _, group in df.groupby(["bytes", "relative_speed"], sort=False):
        g = group.sort_values([quality, "spec"], kind="stable")
        tier, first = 0, None
        tiers = []
        for q in g[quality].to_numpy(dtype=float):
            if first is None or not (q - first <= tie_nats):
                tier, first = tier + 1, q
            tiers.append(tier)
        g = g.assign(_tier=tiers, _rank=g["method"].map(METHOD_COMPUTE_RANK).fillna(99))
        g = g.sort_values(["_tier", "_rank", "spec"], kind="stable")
        alone = len(g) == 1
        tied = g.groupby("_tier")["_tier"].transform("size") > 1
        g["tie_break"] = [None if alone else ("compute (quality within noise)" if t else "quality") for t in tied]
        rows.append(g.drop(columns=["_tier", "_rank"]))
    out = pd.concat(rows) if rows else df.assign(tie_break=None)
    out = out.assign(_neg_speed=-out["relative_speed"]).sort_values(["bytes", "_neg_speed"], kind="stable")
    out = out.drop(columns=["_neg_speed"]).reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


def enumerate_candidates(loaded, specs: Iterable[str] | None = None) -> list[Candidate]:
    """Every spec costed on ``loaded``'s shapes, cheapest first (see :func:`cost_key`)."""
    shapes = layer_shapes(loaded)
    n_linear = sum(o * i for o, i in shapes)
    other = loaded.n_params() - n_linear
    table = _kernel_speed_table()
    other_bytes = stored_other_bytes(loaded)
    cands = [candidate(s, shapes, other, table, other_bytes) for s in (specs or DEFAULT_SPECS)]
    return sorted(cands, key=cost_key)
