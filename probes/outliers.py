"""``outliers``: weight and activation outliers per layer, and their sensitivity to the calibration set.

Weights (no forward pass), per linear layer:
- ``w_kurtosis``: excess kurtosis of all weights (0 for a Gaussian);
- ``w_max_over_rms``: per output channel max |w| / RMS(w), mean and max over channels.

Activations (inputs of each linear layer; layers that share an input share the numbers), per
calibration set:
- ``act_max_over_median``: max |x| / median |x| over all tokens and channels;
- ``act_outlier_share``: share of input channels whose max |x| over tokens exceeds ``channel_factor``
  times the median over channels of that per-channel max (LLM.int8-style outlier features).

Sets: ``calib`` (the first ``n_windows`` given windows), ``shuffled`` (the same tokens in a seeded
random order: meaningless text, like the random-token calibration sets of Paglieri et al. 2024) and
any corpus spec in ``extra_sets`` (default ``stdlib-code:train``: code held apart from the default
calibration part; only ``extra_chars`` characters are read and tokenized, to stay cheap). The
spread across sets (per layer: log10 of max/min over sets of ``act_max_over_median``) measures how
much a model's outliers depend on the calibration data.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re

import numpy as np
import pandas as pd
import torch

from advisor.models.data import Corpus, calibration_windows, load_corpus, stdlib_files
from advisor.models.errors import AdvisorError
from advisor.probes._util import LayerInfo, device_of, first_windows, input_hooks, layer_infos, preserved_state
from advisor.probes.base import Probe, ProbeContext, ProbeResult, register

log = logging.getLogger(__name__)


def weight_stats(W: torch.Tensor) -> dict[str, float]:
    """Kurtosis and per-channel max/RMS of a weight matrix (out, in)."""
    w = W.detach().double()
    c = w - w.mean()
    m2 = float(c.pow(2).mean())
    kurt = float(c.pow(4).mean()) / (m2 * m2) - 3.0 if m2 > 0 else 0.0
    rms = w.pow(2).mean(1).sqrt()
    ratio = torch.where(rms > 0, w.abs().amax(1) / rms.clamp_min(1e-300), torch.zeros_like(rms))
    return {"w_kurtosis": kurt, "w_max_over_rms_mean": float(ratio.mean()), "w_max_over_rms_max": float(ratio.max())}


def activation_stats(x: torch.Tensor, channel_factor: float) -> dict[str, float]:
    """Outlier statistics of one layer input ``x`` (tokens, channels)."""
    a = x.detach().float().abs()
    med = float(a.flatten().median()) if a.numel() <= 16_000_000 else float(a.flatten()[::7].median())
    mx = float(a.max())
    ch_max = a.amax(0)
    ch_med = float(ch_max.median())
    share = float((ch_max > channel_factor * ch_med).float().mean()) if ch_med > 0 else 0.0
    return {"act_max_over_median": mx / med if med > 0 else (0.0 if mx == 0 else 1e6), "act_outlier_share": share}


def _corpus_prefix(spec: str, n_chars: int, seed: int) -> Corpus:
    """About ``n_chars`` characters of a corpus. For ``stdlib-code[:PART]`` only that many characters of
    files are read (in a seeded order: reading the whole part takes seconds); other corpora are
    loaded and cut."""
    name, _, part = spec.partition(":")
    if name != "stdlib-code":
        corpus = load_corpus(spec)
        text = corpus.text[:n_chars]
        return Corpus(corpus.name, text, dict(corpus.protocol, truncated_chars=len(text)))
    files = stdlib_files(part or "eval")
    random.Random(seed).shuffle(files)
    chunks, total, used = [], 0, 0
    for path in files:
        if total >= n_chars:
            break
        try:
            chunk = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunks.append(chunk)
        total += len(chunk) + 2
        used += 1
    if not chunks:
        raise AdvisorError(f"calibration set {spec!r} has no readable files")
    text = "\n\n".join(chunks)[:n_chars]
    proto = {"dataset": "stdlib-code", "split": part or "eval", "format": "seeded-file-sample", "n_files": used,
             "seed": seed, "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "n_chars": len(text)}
    return Corpus(spec, text, proto)


def _set_name(spec: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", spec).strip("_")


class OutliersProbe(Probe):
    name = "outliers"
    description = "weight kurtosis and max/RMS; activation max/median and outlier channels on 2+ calibration sets, their spread"
    version = "1"
    defaults = {
        "n_windows": 1,  # windows per calibration set
        "seq_len": 64,  # tokens of each window used (None = whole window)
        "channel_factor": 8.0,
        "shuffled": True,
        "extra_sets": ["stdlib-code:train"],
        "extra_chars": 200_000,
    }

    def _windows(self, loaded, calib, settings, seed) -> dict[str, torch.Tensor]:
        ids = first_windows(calib, settings["n_windows"])
        if settings["seq_len"] is not None:
            ids = ids[:, : max(2, int(settings["seq_len"]))]
        sets = {"calib": ids}
        if settings["shuffled"]:
            gen = torch.Generator().manual_seed(seed)
            flat = ids.flatten()
            sets["shuffled"] = flat[torch.randperm(flat.numel(), generator=gen)].view_as(ids)
        for spec in settings["extra_sets"] or []:
            if loaded.tokenizer is None:
                log.info("no tokenizer: skipping calibration set %s", spec)
                continue
            corpus = _corpus_prefix(spec, int(settings["extra_chars"]), seed)
            try:
                w = calibration_windows(loaded.tokenizer, corpus, ids.shape[0], ids.shape[1], seed=seed,
                                        max_context=loaded.adapter.max_context)
            except AdvisorError as e:
                log.warning("skipping calibration set %s: %s", spec, e)
                continue
            sets[_set_name(spec)] = w.ids
        return sets

    def _run(self, loaded, calib, *, seed, settings, context: ProbeContext) -> ProbeResult:
        layers = layer_infos(loaded)
        model = loaded.model
        sets = self._windows(loaded, calib, settings, seed)
        factor = float(settings["channel_factor"])
        rows = {li.name: {"layer": li.name, "block": li.block, "kind": li.kind, "role": li.role,
                          "n_params": li.n_params, **weight_stats(li.module.weight)} for li in layers}
        # one hook per distinct input: the first layer of each shared-input group
        readers: dict[tuple[int, int], LayerInfo] = {}
        for li in layers:
            readers.setdefault((li.block, li.group), li)
        for set_name, ids in sets.items():
            acts: dict[str, list[torch.Tensor]] = {li.name: [] for li in readers.values()}

            def keep(li, x, acts=acts):
                acts[li.name].append(x.cpu())

            with preserved_state(model), torch.no_grad(), input_hooks(list(readers.values()), keep):
                dev = device_of(model)
                for i in range(ids.shape[0]):
                    model(input_ids=ids[i : i + 1].to(dev), use_cache=False)
            for li in layers:
                reader = readers[(li.block, li.group)]
                if reader.name not in acts:
                    continue
                stats = activation_stats(torch.cat(acts.pop(reader.name)), factor)
                for other in layers:
                    if (other.block, other.group) == (li.block, li.group):
                        for k, v in stats.items():
                            rows[other.name][f"{k}_{set_name}"] = v
            del acts
        frame = pd.DataFrame(list(rows.values()))
        names = list(sets)
        w = frame["n_params"].to_numpy(dtype=np.float64)
        features = {
            "w_kurtosis_mean": float(np.average(frame["w_kurtosis"], weights=w)),
            "w_kurtosis_max": float(frame["w_kurtosis"].max()),
            "w_max_over_rms_mean": float(np.average(frame["w_max_over_rms_mean"], weights=w)),
            "w_max_over_rms_max": float(frame["w_max_over_rms_max"].max()),
        }
        logs = {}
        for s in names:
            col = frame[f"act_max_over_median_{s}"].clip(lower=1e-12)
            logs[s] = np.log10(col.to_numpy())
            features[f"act_log10_max_over_median_mean_{s}"] = float(logs[s].mean())
            features[f"act_log10_max_over_median_max_{s}"] = float(logs[s].max())
            features[f"act_outlier_share_mean_{s}"] = float(frame[f"act_outlier_share_{s}"].mean())
        if len(names) >= 2:
            stack = np.stack([logs[s] for s in names])  # (sets, layers)
            spread = stack.max(0) - stack.min(0)
            frame["act_log10_spread"] = spread
            features["act_log10_spread_mean"] = float(spread.mean())
            features["act_log10_spread_max"] = float(spread.max())
            shares = np.stack([frame[f"act_outlier_share_{s}"].to_numpy() for s in names])
            features["act_outlier_share_spread_mean"] = float((shares.max(0) - shares.min(0)).mean())
            if "calib" in names:
                for s in names:
                    if s != "calib":
                        features[f"act_log10_shift_{s}_vs_calib"] = float((logs[s] - logs["calib"]).mean())
        info = {"sets": {s: int(sets[s].numel()) for s in names}}
        return ProbeResult(self.name, features, frame, settings, info=info)


register(OutliersProbe())
