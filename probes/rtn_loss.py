"""``rtn_loss``: the measured loss increase of round-to-nearest, per data type (all orders).

For each format, every linear layer is replaced by its RTN-quantized weights (the quantizers' own
``rtn`` method, at the format's group size and symmetry), the mean token NLL on the first ``n_windows``
calibration windows is measured and the weights are restored:

    dnll = mean NLL(RTN weights) - mean NLL(float weights)       (paired: same windows, same tokens)

``second_order`` estimates the same quantity to second order from the Fisher diagonal. That estimate
is exact in scale for small errors but misses what matters at 2-4 bits on a well-trained model: the
off-diagonal curvature and the step-like rise of the loss once the error leaves the quadratic bowl
(on SmolLM2-135M the ratio measured / second-order goes from 0.6 at 6 bits to 1.2 at 3 bits). RTN
costs no calibration solve, so measuring it directly is cheap: one quantization pass and one forward
pass over a few thousand tokens per format. The predictor uses it as its physics term, and corrects
it for the method (GPTQ, AWQ, ...) and the evaluation set with fitted terms.

Features per format key (``int4_g128``, ``int8_pc``, ``mxfp4``, ``int3_g256_asym``: any group size and
symmetry the quantizers accept; see ``probes.feature_key``):
- ``<key>``: dnll in nats;
- ``<key>_se``: its standard error over windows (sd of the per-window paired differences / sqrt(n)).

Settings: ``keys`` (None = every data type at its default group size; any list of keys, e.g. one
off-grid format, is measured on its own), ``n_windows`` (the most windows to use; None = all),
``target_rel_se`` and ``min_windows`` (stop early, below), ``batch_size`` (windows per forward).

Stopping when the answer is known: with ``target_rel_se`` or ``target_abs_se`` set, a format is
measured on ``min_windows`` windows first, then, if its standard error is not yet small enough, on as
many more as the error's ``1/sqrt(n)`` says the target needs, but at most ``min_windows`` more per round
(at most ``n_windows`` in all; each round is one RTN pass per ``batch_size`` windows), and it stops once
its standard error is at most ``target_rel_se`` of its mean loss increase, or at most ``target_abs_se``
nats (a loss too small to matter, known well enough: 8 bits on a real model), or when the target is out
of reach (it would need more than ``OUT_OF_REACH`` times ``n_windows``: a loss lost in its noise, which
the predictor weighs by its standard error); otherwise it uses every window.
The per-layer table records the windows used and the relative standard error reached (``rel_se``).
With both targets None every format uses all ``n_windows``.

Work shared across formats: the baseline's per-window NLL is measured once per run (``ProbeContext``,
``"rtn_loss.base"``) and only on the windows some format needs; the head runs on chunks of tokens
(``_util.chunked_window_nll``: no ``(tokens, vocab)`` float32 tensor). Memory: the RTN weights of one
linear layer at a time (each layer's weight is swapped for its RTN weights for the duration of its own
call and swapped back, bitwise, by a pair of hooks), so the probe holds no copy of the model.
Cost: per format and batch of windows, one RTN pass over the linear layers and one forward pass.
"""
from __future__ import annotations

import math
from typing import Callable

import pandas as pd
import torch

from advisor.probes._rtn import format_table, is_symmetric_key, rtn_weight
from advisor.probes._util import (chunked_window_nll, device_of, first_windows, layer_infos, preserved_state,
                                  swapped_weights)
from advisor.probes.base import Probe, ProbeContext, ProbeResult, register


# A format stops early when its target needs more than this many times ``n_windows``: the windows left
# would shrink its standard error by at most sqrt(n_windows / min_windows) and still not reach the target.
OUT_OF_REACH = 4


def _window_nll(model, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    dev = device_of(model)
    return torch.cat([chunked_window_nll(model, ids[i : i + batch_size].to(dev)).double().cpu()
                      for i in range(0, ids.shape[0], batch_size)])


def base_nll(model, ids: torch.Tensor, n: int, batch_size: int, context: ProbeContext, key) -> torch.Tensor:
    """The baseline per-window NLL of the first ``n`` windows, measured once per run (extended on demand)."""
    store = context.cache.setdefault("rtn_loss.base", {})
    have = store.get(key, torch.zeros(0, dtype=torch.float64))
    if have.numel() < n:
        have = torch.cat([have, _window_nll(model, ids[have.numel() : n], batch_size)])
        store[key] = have
    return have[:n]


def measure(loaded, ids: torch.Tensor, table: list[tuple[str, int | None, str]], *, batch_size: int = 4,
            target_rel_se: float | None = None, target_abs_se: float | None = None, min_windows: int = 2, context: ProbeContext | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> tuple[list[dict], torch.Tensor]:
    """The paired RTN loss increase of each format of ``table`` on windows ``ids`` (module docstring).

    Returns:
        (one row per format: key, dtype, group_size, dnll, se, rel_se, n_windows, rtn_passes;
         the baseline per-window NLL of the windows measured)
    """
    model = loaded.model
    layers = layer_infos(loaded)
    context = context if context is not None else ProbeContext()
    base_key = (ids.data_ptr(), tuple(ids.shape), str(ids.dtype))
    n_max = ids.shape[0]
    adaptive = target_rel_se is not None or target_abs_se is not None
    first = min(n_max, max(2, int(min_windows))) if adaptive else n_max
    rows = []
    for f, (dtype, group, key) in enumerate(table):
        diffs = torch.zeros(0, dtype=torch.float64)
        passes, done, n = 0, 0, first
        while True:
            base = base_nll(model, ids, n, batch_size, context, base_key)
            with swapped_weights(layers, lambda W, name: rtn_weight(W, dtype, group, is_symmetric_key(key))):
                for i in range(done, n, batch_size):
                    part = ids[i : min(i + batch_size, n)]
                    q = chunked_window_nll(model, part.to(device_of(model))).double().cpu()
                    diffs = torch.cat([diffs, q - base[i : i + part.shape[0]]])
                    passes += 1
            done = n
            mean = float(diffs.mean())
            se = float(diffs.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
            if not adaptive or n >= n_max or not math.isfinite(se):
                break
            need = [n * (se / (target_rel_se * abs(mean))) ** 2 if target_rel_se is not None and mean != 0 else math.inf,
                    n * (se / target_abs_se) ** 2 if target_abs_se is not None else math.inf]
            if min(need) <= n or min(need) > OUT_OF_REACH * n_max:
                break
            # towards the windows the standard error (~ 1/sqrt(n)) says are needed, ``first`` more at most per
            # round: an estimate from few windows is itself noisy, and a window too many (two forward
            # passes) costs more than one more round (one RTN pass)
            n = min(n_max, n + first, max(n + 1, math.ceil(min(need))))
        rel = se / abs(mean) if mean != 0 and math.isfinite(se) else float("inf")
        rows.append({"key": key, "dtype": dtype, "group_size": group, "dnll": mean, "se": se,
                     "rel_se": rel, "n_windows": done, "rtn_passes": passes})
        if progress is not None:
            progress(key, f + 1, len(table))
    return rows, context.cache["rtn_loss.base"].get(base_key, torch.zeros(0, dtype=torch.float64))


class RtnLossProbe(Probe):
    name = "rtn_loss"
    description = "measured dNLL of round-to-nearest per data type on calibration windows (all orders)"
    version = "1"
    defaults = {
        "keys": None,  # feature keys to measure; None = every data type at its default group size
        "n_windows": None,  # the most windows to use; None = every calibration window given
        "target_rel_se": None,  # stop a format once se <= this x |dnll| (None: every window)
        "target_abs_se": None,  # or once se <= this many nats (a loss too small to matter, known well enough)
        "min_windows": 2,  # first round of the early stop
        "batch_size": 8,  # windows per forward pass (and per RTN pass: the RTN weights are not kept)
    }

    def _run(self, loaded, calib, *, seed, settings, context: ProbeContext) -> ProbeResult:
        table = format_table(settings["keys"])
        ids = first_windows(calib, settings["n_windows"])
        target, floor = settings["target_rel_se"], settings["target_abs_se"]
        with preserved_state(loaded.model), torch.no_grad():
            rows, base = measure(loaded, ids, table, batch_size=max(1, int(settings["batch_size"])),
                                 target_rel_se=None if target is None else float(target),
                                 target_abs_se=None if floor is None else float(floor),
                                 min_windows=int(settings["min_windows"]), context=context,
                                 progress=context.progress)
        frame = pd.DataFrame(rows)
        features: dict[str, float] = {}
        for r in rows:
            features[r["key"]] = r["dnll"]
            features[f"{r['key']}_se"] = r["se"]
        info = {"n_tokens": int(base.numel() * ids.shape[1]), "base_nll": float(base.mean()),
                "by_key": {r["key"]: [r["key"], f"{r['key']}_se"] for r in rows},
                "precision": {r["key"]: {"n_windows": r["n_windows"], "rel_se": r["rel_se"]} for r in rows},
                "rtn": "round-to-nearest (the key's symmetry) through quantizers' rtn method, every linear layer"}
        return ProbeResult(self.name, features, frame, settings, info=info)


register(RtnLossProbe())
