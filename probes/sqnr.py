"""``sqnr``: signal-to-quantization-noise ratio of round-to-nearest, per layer and data type (no forward pass).

For every data type and group size (per channel, g32, g64, g128; MX types: their fixed block of 32),
per layer ``SQNR = 10 log10(sum W^2 / sum (Q(W) - W)^2)`` dB, with ``Q`` the quantizers' RTN. Model
level: the mean over layers weighted by parameter count (``<key>_db``) and the worst layer
(``<key>_min_db``). Xu et al. 2024 use the RTN weight SQNR as a predictor input.

Cost control: the errors are computed on a seeded random subset of each layer's rows, the same
fraction of every layer, so that a whole config touches about ``max_elements`` weights (exact for the
chosen rows; ``max_elements: null`` for every row). See ``probes._rtn``. ``keys`` (a list of feature
keys) measures exactly those formats.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from advisor.probes._rtn import cached_rtn_errors, configs, format_table, is_symmetric_key, layer_rows, row_fraction
from advisor.probes._util import layer_infos
from advisor.probes.base import Probe, ProbeContext, ProbeResult, register


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise), capped at 200 dB for an exact representation."""
    if noise <= 0:
        return 200.0
    if signal <= 0:
        return 0.0
    return min(200.0, 10.0 * math.log10(signal / noise))


class SqnrProbe(Probe):
    name = "sqnr"
    description = "SQNR (dB) of round-to-nearest per layer for every data type and group size; parameter-weighted means"
    version = "1"
    defaults = {
        "keys": None,  # feature keys to measure (e.g. ["int4_g128"]); None = every group size of ``dtypes``
        "dtypes": None,  # None = every registered data type
        "max_elements": 500_000,  # weights quantized per config (row sample); None = all
        "min_rows": 1,
    }

    def _run(self, loaded, calib, *, seed, settings, context: ProbeContext) -> ProbeResult:
        layers = layer_infos(loaded)
        if settings["keys"] is not None:
            cfgs = format_table(list(settings["keys"]))
        else:
            cfgs = configs(settings["dtypes"], all_group_sizes=True)
        args = (settings["max_elements"], int(settings["min_rows"]), seed)
        rows = layer_rows(layers, *args)
        signal = [float(li.module.weight.detach()[r].double().pow(2).sum()) for li, r in zip(layers, rows)]
        table = {f"{key}_db": [] for _, _, key in cfgs}
        for dtype, g, key in cfgs:
            _, errors = cached_rtn_errors(context.cache, layers, *args, dtype, g, is_symmetric_key(key))
            table[f"{key}_db"] = [sqnr_db(s, float(e.double().pow(2).sum())) for s, e in zip(signal, errors)]
        frame = pd.DataFrame({"layer": [li.name for li in layers], "block": [li.block for li in layers],
                              "kind": [li.kind for li in layers], "role": [li.role for li in layers],
                              "n_params": [li.n_params for li in layers], "rows_used": [int(r.numel()) for r in rows],
                              **table})
        w = frame["n_params"].to_numpy(dtype=np.float64)
        features: dict[str, float] = {}
        for _, _, key in cfgs:
            features[f"{key}_db"] = float(np.average(frame[f"{key}_db"], weights=w))
            features[f"{key}_min_db"] = float(frame[f"{key}_db"].min())
        info = {"row_fraction": row_fraction(layers, settings["max_elements"]), "n_configs": len(cfgs),
                "configs": [key for _, _, key in cfgs],
                "by_key": {key: [f"{key}_db", f"{key}_min_db"] for _, _, key in cfgs}}
        return ProbeResult(self.name, features, frame, settings, info=info)


register(SqnrProbe())
