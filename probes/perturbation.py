"""``perturbation``: radial loss curves under relative Gaussian weight noise.

For a target set of linear layers (``all``, ``attn`` or ``mlp``) and a seeded direction ``Z`` (one
standard normal matrix per layer), the weights become ``W + sigma * rms_row(W) * Z`` (each output
channel's noise scaled to that channel's RMS, i.e. relative noise of size ``sigma``) and the increase
of mean NLL on the first ``n_windows`` calibration windows is measured, for log-spaced ``sigma``.
Along one direction the curve is a radial slice of the loss landscape (Xu et al. 2024 report a
step-like rise: flat, then sharp; Gong et al. 2024 study relative-magnitude noise like this).

Fitted per target (averaged over directions):
- ``knee_sigma``: where dNLL first crosses ``knee_dnll`` (log-log interpolation); the largest sigma
  when it never does (``knee_censored`` = 1).
- ``slope``: log-log slope of dNLL vs sigma above the knee (2 for a quadratic bowl; larger = step).
- ``quad_coef``: least-squares ``c`` in ``dNLL = c sigma^2`` over points up to the knee
  (second-order theory: ``c = 1/2 sum_i H_ii rms_row(i)^2``).
Each layer computes with its noisy weights only during its own call (``_util.swapped_weights``; the
direction is regenerated from its seed), so the weights are never modified and no copy of the model
or of the noise is held.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
import torch

from advisor.probes._util import (ATTN, MLP, device_of, first_windows, layer_infos, mean_nll, preserved_state, sigma_key,
                                  swapped_weights)
from advisor.probes.base import Probe, ProbeContext, ProbeResult, register

TARGETS = ("all", ATTN, MLP)


def knee_and_slope(sigmas: np.ndarray, dnll: np.ndarray, threshold: float) -> tuple[float, float, float, bool]:
    """Curve parameters of one radial curve.

    Args:
        sigmas: increasing relative noise sizes (k,).
        dnll: loss increases (k,).
        threshold: dNLL (nats) that defines the knee.
    Returns:
        (knee_sigma, slope above the knee, quadratic coefficient below it, censored)
    """
    above = np.nonzero(dnll >= threshold)[0]
    if len(above) == 0:
        knee, censored, first = float(sigmas[-1]), True, len(sigmas)
    else:
        first, censored = int(above[0]), False
        if first == 0:
            knee = float(sigmas[0])
        else:
            lo, hi = first - 1, first
            d_lo = max(float(dnll[lo]), threshold * 1e-3)
            t = (math.log(threshold) - math.log(d_lo)) / (math.log(float(dnll[hi])) - math.log(d_lo))
            t = min(max(t, 0.0), 1.0)
            knee = float(math.exp(math.log(sigmas[lo]) + t * (math.log(sigmas[hi]) - math.log(sigmas[lo]))))
    # slope above the knee: points from the knee on with positive dNLL (at least the last two positives)
    idx = [i for i in range(max(first - 1, 0), len(sigmas)) if dnll[i] > 0]
    if len(idx) < 2:
        idx = [i for i in range(len(sigmas)) if dnll[i] > 0][-2:]
    slope = float(np.polyfit(np.log(sigmas[idx]), np.log(dnll[idx]), 1)[0]) if len(idx) >= 2 else 0.0
    below = slice(0, max(first, 1))
    s2 = sigmas[below] ** 2
    quad = float((dnll[below] * s2).sum() / (s2 * s2).sum())
    return knee, slope, quad, censored


class PerturbationProbe(Probe):
    name = "perturbation"
    description = "radial loss curves: dNLL under relative Gaussian weight noise (all / attn / mlp), knee, slope"
    version = "1"
    defaults = {
        "sigmas": [0.0025, 0.0075, 0.022, 0.066, 0.2],  # relative to each output channel's RMS (x3 steps)
        "targets": list(TARGETS),
        "n_directions": 1,
        "n_windows": 1,
        "seq_len": 64,  # tokens of each window used (None = whole window)
        "knee_dnll": 0.01,  # nats; dNLL that marks the end of the flat region
    }

    def _run(self, loaded, calib, *, seed, settings, context: ProbeContext) -> ProbeResult:
        layers = layer_infos(loaded)
        model = loaded.model
        sigmas = np.array(sorted(float(s) for s in settings["sigmas"]), dtype=np.float64)
        if len(sigmas) < 2 or sigmas[0] <= 0:
            raise ValueError(f"perturbation sigmas must be 2+ positive values, got {settings['sigmas']}")
        targets = list(settings["targets"])
        for t in targets:
            if t not in TARGETS:
                raise ValueError(f"unknown perturbation target {t!r}; known: {', '.join(TARGETS)}")
        ids = first_windows(calib, settings["n_windows"])
        if settings["seq_len"] is not None:
            ids = ids[:, : max(2, int(settings["seq_len"]))]
        ids = ids.to(device_of(model))
        rows = []
        with preserved_state(model), torch.no_grad():
            base = mean_nll(model, ids)
            rms = {li.name: li.module.weight.detach().float().pow(2).mean(1, keepdim=True).sqrt().cpu() for li in layers}
            index = {li.name: i for i, li in enumerate(layers)}
            for d in range(int(settings["n_directions"])):
                def noisy(W: torch.Tensor, name: str, sigma: float, d=d) -> torch.Tensor:
                    # the direction Z of this layer, regenerated from its seed at each call: one layer's
                    # noise exists at a time, and every target and sigma sees the same Z (radial curves)
                    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{d}:{index[name]}".encode()))
                    z = torch.randn(W.shape, generator=gen)
                    return W.add((z * rms[name]).to(W.device, W.dtype), alpha=sigma)

                for target in targets:
                    chosen = [li for li in layers if target == "all" or li.kind == target]
                    if not chosen:
                        continue
                    for sigma in sigmas:
                        with swapped_weights(chosen, noisy, float(sigma)):
                            dnll = mean_nll(model, ids) - base
                        rows.append({"target": target, "direction": d, "sigma": float(sigma), "dnll": dnll})
        frame = pd.DataFrame(rows)
        features: dict[str, float] = {"base_nll": base}
        for target in targets:
            sub = frame[frame["target"] == target]
            if sub.empty:
                continue
            curve = sub.groupby("sigma")["dnll"].mean().reindex(sigmas).to_numpy()
            knee, slope, quad, censored = knee_and_slope(sigmas, curve, float(settings["knee_dnll"]))
            features[f"{target}_knee_sigma"] = knee
            features[f"{target}_knee_censored"] = float(censored)
            features[f"{target}_slope"] = slope
            features[f"{target}_quad_coef"] = quad
            for s, v in zip(sigmas, curve):
                features[f"{target}_dnll_{sigma_key(s)}"] = float(v)
            if settings["n_directions"] > 1:
                top = sub[sub["sigma"] == sigmas[-1]]["dnll"]
                features[f"{target}_direction_std_at_max"] = float(top.std(ddof=1))
        info = {"n_tokens": int(ids.numel()), "noise": "W + sigma * rms_row(W) * N(0, 1), one direction per seed"}
        return ProbeResult(self.name, features, frame, settings, info=info)


register(PerturbationProbe())
