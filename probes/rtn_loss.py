"""``rtn_loss``: the measured loss increase of round-to-nearest, per data type (all orders).

For each format, every linear layer is replaced by its RTN-quantized weights (the quantizers' own
``rtn`` method, symmetric, at the format's group size), the mean token NLL on the first ``n_windows``
calibration windows is measured and the weights are restored:

    dnll = mean NLL(RTN weights) - mean NLL(float weights)       (paired: same windows, same tokens)

``second_order`` estimates the same quantity to second order from the Fisher diagonal. That estimate
is exact in scale for small errors but misses what matters at 2-4 bits on a well-trained model: the
off-diagonal curvature and the step-like rise of the loss once the error leaves the quadratic bowl
(on SmolLM2-135M the ratio measured / second-order goes from 0.6 at 6 bits to 1.2 at 3 bits). RTN
costs no calibration solve, so measuring it directly is cheap: one quantization pass and one forward
pass over a few thousand tokens per format. The predictor uses it as its physics term, and corrects
it for the method (GPTQ, AWQ, ...) and the evaluation set with fitted terms.

Features per format key (``int4_g128``, ``int8_pc``, ``mxfp4``; see ``probes.feature_key``):
- ``<key>``: dnll in nats;
- ``<key>_se``: its standard error over windows (sd of the per-window paired differences / sqrt(n)).

Settings: ``keys`` (None = every data type at its default group size), ``n_windows`` (None = all).
Cost: per format, one RTN pass over all linear layers plus one forward pass over the windows.
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from advisor.probes._rtn import configs, rtn_weight
from advisor.probes._util import first_windows, layer_infos, preserved_state, window_nll
from advisor.probes.base import Probe, ProbeContext, ProbeResult, register
from advisor.models.errors import AdvisorError


def format_table(keys: list[str] | None) -> list[tuple[str, int | None, str]]:
    """(dtype, group size, key) of the requested feature keys (None: every data type at its default group).

    Raises:
        AdvisorError: a key that names no (data type, group size) of the ``sqnr`` grid.
    """
    if keys is None:
        return configs(None, all_group_sizes=False)
    known = {k: (d, g, k) for d, g, k in configs(None, all_group_sizes=True)}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise AdvisorError(f"rtn_loss: unknown format keys {unknown}; keys look like int4_g128, int8_pc, mxfp4 "
                           f"(known: {', '.join(sorted(known))})")
    return [known[k] for k in dict.fromkeys(keys)]


class RtnLossProbe(Probe):
    name = "rtn_loss"
    description = "measured dNLL of round-to-nearest per data type on calibration windows (all orders)"
    version = "1"
    defaults = {
        "keys": None,  # feature keys to measure; None = every data type at its default group size
        "n_windows": None,  # None = every calibration window given
        "batch_size": 4,
    }

    def _run(self, loaded, calib, *, seed, settings, context: ProbeContext) -> ProbeResult:
        layers = layer_infos(loaded)
        model = loaded.model
        table = format_table(settings["keys"])
        ids = first_windows(calib, settings["n_windows"])
        bs = max(1, int(settings["batch_size"]))
        rows = []
        with preserved_state(model), torch.no_grad():
            base = window_nll(model, ids, bs).double()
            originals = {li.name: li.module.weight.detach().clone() for li in layers}
            try:
                for dtype, group, key in table:
                    for li in layers:
                        li.module.weight.copy_(rtn_weight(originals[li.name], dtype, group))
                    diff = window_nll(model, ids, bs).double() - base
                    n = diff.numel()
                    se = float(diff.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
                    rows.append({"key": key, "dtype": dtype, "group_size": group, "dnll": float(diff.mean()),
                                 "se": se, "n_windows": n})
            finally:  # every format overwrites every layer from the originals, so one restore at the end
                for li in layers:
                    li.module.weight.copy_(originals[li.name])
        frame = pd.DataFrame(rows)
        features: dict[str, float] = {}
        for r in rows:
            features[r["key"]] = r["dnll"]
            features[f"{r['key']}_se"] = r["se"]
        info = {"n_tokens": int(ids.numel()), "base_nll": float(base.mean()),
                "rtn": "symmetric round-to-nearest through quantizers' rtn method, every linear layer"}
        return ProbeResult(self.name, features, frame, settings, info=info)


register(RtnLossProbe())
