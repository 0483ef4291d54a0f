"""``second_order``: the second-order estimate of the loss increase of round-to-nearest, per data type.

    dL ~ 1/2 * sum_i F_ii * e_i^2

with ``F`` the Fisher diagonal of the mean-token NLL (``fisher`` probe, token-scaled) and ``e`` the
RTN error of each weight (docs/ARCHITECTURE.md, the predictor). The first-order term is dropped: at a trained
minimum the mean gradient is ~0, and for RTN it averages out over many weights of both signs.

Also ``first_order_<key>`` = ``g . e`` with ``g`` the mean gradient of the calibration loss (from the
same ``fisher`` pass): zero in expectation at a trained minimum, but systematic for under-trained
models or formats that shrink weights (it is measured, noisily, from few calibration tokens).

Features: ``<key>`` for every data type at its default group size (``_rtn.default_group``: per
channel at 6-8 bits, g128 for int3/int4/fp4, g64 for nf3/nf4/int2, MX block 32) and, with
``all_group_sizes``, also every group size of the ``sqnr`` grid; ``log10_<key>`` too. Keys look like
``int4_g128``, ``int8_pc``, ``mxfp4`` (see ``probes.feature_key``).

``keys`` (a list of feature keys) estimates exactly those formats instead (what a request for a few
candidates needs).

Cost: as ``sqnr``, on a seeded subset of rows (same fraction of every layer; sums scaled by
``out / rows``); with the same ``max_elements``, ``min_rows`` and seed as ``sqnr`` the RTN errors
are shared within one ``run_probes`` call.
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from advisor.probes._rtn import (cached_rtn_errors, configs, default_group, format_table, is_symmetric_key,
                                  row_fraction)
from advisor.probes._util import layer_infos, spec_key
from advisor.probes.base import Probe, ProbeContext, ProbeResult, register
from advisor.probes.fisher import ensure_fisher


def second_order_estimate(fisher: torch.Tensor, error: torch.Tensor) -> float:
    """``1/2 * sum(F * e^2)``: the second-order loss increase of a weight error ``e`` (same shapes)."""
    return 0.5 * float((fisher.double() * error.double().pow(2)).sum())


class SecondOrderProbe(Probe):
    name = "second_order"
    description = "1/2 sum F_ii e_i^2: Fisher-weighted RTN error, the second-order loss increase per data type"
    version = "1"
    defaults = {
        "keys": None,  # feature keys to estimate (e.g. ["int4_g128"]); None = by dtypes / all_group_sizes
        "dtypes": None,  # None = every registered data type
        "all_group_sizes": True,  # also every sqnr group size, not only the default one
        "max_elements": 500_000,
        "min_rows": 1,
    }

    def _run(self, loaded, calib, *, seed, settings, context: ProbeContext) -> ProbeResult:
        from advisor.quantizers import get_dtype

        layers = layer_infos(loaded)
        diag, grad = ensure_fisher(loaded, calib, seed, context)
        if settings["keys"] is not None:
            wanted = format_table(list(settings["keys"]))
            defaults = {}
        else:
            cfgs = configs(settings["dtypes"], all_group_sizes=bool(settings["all_group_sizes"]))
            defaults = {name: spec_key(name, default_group(name), get_dtype(name).block_size) for name, _, _ in cfgs}
            wanted = list(dict.fromkeys(cfgs + [(n, default_group(n), defaults[n]) for n, _, _ in cfgs]))
        args = (settings["max_elements"], int(settings["min_rows"]), seed)
        rows = [{"layer": li.name, "block": li.block, "kind": li.kind, "role": li.role, "n_params": li.n_params}
                for li in layers]
        for dtype, g, key in wanted:
            idx, errors = cached_rtn_errors(context.cache, layers, *args, dtype, g, is_symmetric_key(key))
            for row, li, r, e in zip(rows, layers, idx, errors):
                scale = li.module.out_features / r.numel()
                row[key] = scale * second_order_estimate(diag[li.name], e)
                row[f"first_order_{key}"] = scale * float((grad[li.name].double() * e.double()).sum())
                row["rows_used"] = int(r.numel())
        frame = pd.DataFrame(rows)
        features: dict[str, float] = {}
        for _, _, key in wanted:
            total = float(frame[key].sum())
            features[key] = total
            features[f"log10_{key}"] = math.log10(total) if total > 0 else -30.0
            features[f"first_order_{key}"] = float(frame[f"first_order_{key}"].sum())
        info = {"row_fraction": row_fraction(layers, settings["max_elements"]), "default_keys": defaults,
                "by_key": {key: [key, f"log10_{key}", f"first_order_{key}"] for _, _, key in wanted},
                "fisher": context.cache.get("fisher.settings", {})}
        return ProbeResult(self.name, features, frame, settings, info=info)


register(SecondOrderProbe())
