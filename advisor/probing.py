"""Probe features for the predictor, measured only where a request needs them, cached in the SQLite store.

The cache unit is one probe's features for one *key*: a format key (``int4_g128``) for the probes that
measure formats (``sqnr``, ``second_order``, ``rtn_loss``), a target (``all``, ``attn``, ``mlp``) for
``perturbation``, and the whole probe for the others (``fisher``, ``hessian``, ``outliers``). A record's
identity is the model fingerprint plus ``unit_key``: probe name and version, the key, the settings that
change its values (not the ones that only select keys), seed and calibration protocol, and
``PROBE_FORMAT`` (``probes.base.FORMAT_VERSION``). So a request for one candidate measures one format;
a later request for another format measures only that one; and a sweep that probes everything fills
the same records a prediction reads.

What the predictor reads (``advisor.features``): ``second_order.<key>`` (which needs ``fisher`` run in
the same process, for its diagonal), ``sqnr.<key>_db``, ``perturbation.all_knee_sigma`` and
``rtn_loss.<key>``/``<key>_se``. ``probe_features`` measures those for the requested keys; with
``full=True`` (the sweep, whose stored features feed the fit) also every landscape probe and format.

Two sets of windows: the landscape probes run on the probes' own small windows
(``Protocol.probe_windows``);
``rtn_loss`` on the first windows of the quantization calibration set (the evaluation protocol's
context length, since the loss increase depends on it).

Before probing, ``estimate`` says what the probes to run will cost (seconds from the model's size, its
vocabulary and the device's measured speed; memory beyond the loaded weights), and each probe reports
its progress with an ETA (on stderr, when ``progress``).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from advisor.features import LANDSCAPE_PROBES, PROBE_SETTINGS, RTN_LOSS_KEYS, RTN_LOSS_SETTINGS
from advisor.probes.base import FORMAT_VERSION as PROBE_FORMAT  # the one version of every cached probe record
from advisor.store import Store, protocol_key

log = logging.getLogger(__name__)

# Probes whose features come per key: probe -> (setting that selects the keys, settings that only select)
KEYED = {"sqnr": ("keys", ("keys", "dtypes")), "second_order": ("keys", ("keys", "dtypes", "all_group_sizes")),
         "rtn_loss": ("keys", ("keys",)), "perturbation": ("targets", ("targets",))}
# Features of a perturbation target also carry the baseline NLL of its windows
_PERTURBATION_SHARED = ("base_nll",)
# The order the landscape probes run in (fisher before second_order: it leaves its diagonal behind)
ORDER = ("hessian", "fisher", "perturbation", "outliers", "sqnr", "second_order", "rtn_loss")


def probe_keys(specs: Iterable[str] | None) -> list[str]:
    """The format keys the candidates ``specs`` need (None: the default grid's, ``RTN_LOSS_KEYS``)."""
    from advisor.probes import feature_key

    if specs is None:
        return list(RTN_LOSS_KEYS)
    return list(dict.fromkeys(feature_key(s) for s in specs))


@dataclass(frozen=True)
class Unit:
    """One cached record: ``probe``'s features for ``key`` (None for probes that are not keyed)."""

    probe: str
    key: str | None
    on_loss_windows: bool = False


def units_for(keys: list[str], full: bool = False) -> list[Unit]:
    """The records a prediction for format ``keys`` needs; with ``full``, also every other landscape probe
    and, for ``sqnr``/``second_order``, every format of their grids (what a sweep stores)."""
    units = [Unit("fisher", None), Unit("perturbation", "all")]
    so_keys = list(keys)
    if full:
        from advisor.probes._rtn import configs

        grid = [k for _, _, k in configs(None, all_group_sizes=True)]
        so_keys = list(dict.fromkeys(grid + so_keys))
        units = [Unit(p, None) for p in LANDSCAPE_PROBES if p not in KEYED]
        units += [Unit("perturbation", t) for t in ("all", "attn", "mlp")]
    units += [Unit("sqnr", k) for k in so_keys] + [Unit("second_order", k) for k in so_keys]
    units += [Unit("rtn_loss", k, on_loss_windows=True) for k in keys]
    return units


def base_settings(probe: str) -> dict[str, Any]:
    """The resolved settings the predictor's probes run with, minus those that only select keys."""
    from advisor.probes import get_probe

    overrides = {**PROBE_SETTINGS, **RTN_LOSS_SETTINGS}.get(probe, {})
    resolved = get_probe(probe).resolve_settings(overrides)
    drop = KEYED.get(probe, (None, ()))[1]
    return {k: v for k, v in resolved.items() if k not in drop}


def unit_key(unit: Unit, seed: int, calibration: dict[str, Any]) -> dict[str, Any]:
    """The identity of a record in the store's ``probes`` table (hashed there)."""
    from advisor.probes import get_probe

    return {"probe_format": PROBE_FORMAT, "probe": unit.probe, "version": get_probe(unit.probe).version,
            "key": unit.key, "settings": base_settings(unit.probe), "seed": seed,
            "calibration": protocol_key(calibration)}


def split_record(record, probe: str) -> dict[str | None, dict[str, float]]:
    """A ``FeatureRecord``'s features of ``probe``, per key (``{None: all}`` for probes that are not keyed)."""
    prefix = f"{probe}."
    mine = {k[len(prefix):]: v for k, v in record.features.items() if k.startswith(prefix)}
    if probe not in KEYED:
        return {None: {prefix + k: v for k, v in mine.items()}}
    out: dict[str | None, dict[str, float]] = {}
    if probe == "perturbation":
        shared = {f: mine[f] for f in _PERTURBATION_SHARED if f in mine}
        targets = record.provenance["probes"][probe]["settings"]["targets"]
        for t in targets:
            part = {f: v for f, v in mine.items() if f.startswith(f"{t}_")}
            if part:
                out[t] = {prefix + f: v for f, v in {**part, **shared}.items()}
        return out
    for key, names in record.provenance["probes"][probe]["by_key"].items():
        out[key] = {prefix + f: mine[f] for f in names if f in mine}
    return out


# ---------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """What the probes still to run should cost: seconds (from the device's measured speed) and the
    memory they add to the loaded weights (bytes), per probe."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    seconds_per_token: float = 0.0
    speed_source: str = ""

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    @property
    def peak_bytes(self) -> int:
        return int(max(self.bytes.values(), default=0))

    def describe(self) -> str:
        if not self.seconds:
            return "probes: every feature needed is cached"
        parts = ", ".join(f"{p} {s:.0f}s" for p, s in self.seconds.items())
        return (f"probes: about {_fmt_s(self.total_seconds)} and {self.peak_bytes / 2**30:.2f} GiB beyond the weights "
                f"({parts}; speed {self.seconds_per_token * 1e3:.2f} ms/token from {self.speed_source})")


def _fmt_s(s: float) -> str:
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f} min"


def model_shape(loaded) -> dict[str, int]:
    """Sizes the cost model reads: linear-layer parameters, widths, blocks, vocabulary, hidden size."""
    from advisor.probes._util import layer_infos

    layers = layer_infos(loaded)
    head = loaded.model.get_output_embeddings() if hasattr(loaded.model, "get_output_embeddings") else None
    vocab = int(head.weight.shape[0]) if head is not None else int(getattr(loaded.model.config, "vocab_size", 0))
    hidden = int(head.weight.shape[1]) if head is not None else int(getattr(loaded.model.config, "hidden_size", 0))
    return {"linear_params": sum(li.n_params for li in layers), "n_blocks": 1 + max(li.block for li in layers),
            "max_layer": max(li.n_params for li in layers), "act_width": sum(li.module.in_features + li.module.out_features
                                                                           for li in layers),
            "vocab": vocab, "hidden": hidden}


def measured_speed(loaded, windows, seconds_per_token: float | None = None) -> tuple[float, str]:
    """Seconds per token of one forward pass of the model on this device: ``seconds_per_token`` when the
    caller measured it (the baseline evaluation), else timed on one window of ``windows``."""
    import torch

    from advisor.probes._util import chunked_window_nll, device_of

    if seconds_per_token:
        return float(seconds_per_token), "the baseline evaluation"
    ids = windows.ids[:1].to(device_of(loaded.model))
    with torch.no_grad():
        t0 = time.perf_counter()
        chunked_window_nll(loaded.model, ids)
        return (time.perf_counter() - t0) / ids.numel(), f"a timed {ids.shape[1]}-token forward"


def estimate(loaded, units: list[Unit], windows, loss_windows, seconds_per_token: float) -> Estimate:
    """The cost of running ``units`` (see ``Estimate``), from forward-pass token counts.

    Model: a backward pass costs two forwards; a Hessian-vector product about ten; an RTN pass over the
    linear layers about as much as a forward of ``RTN_PASS_TOKENS`` tokens, scaled by the linear layers'
    share of a token's forward work (the head's ``vocab x hidden`` being the rest); every
    ``rtn_loss`` format is counted at its most windows (early stopping makes it cheaper).
    """
    from advisor.probes import get_probe

    shape = model_shape(loaded)
    n, t = windows.ids.shape
    probes = list(dict.fromkeys(u.probe for u in units))
    est = Estimate(seconds_per_token=seconds_per_token)
    act = 4 * shape["act_width"]  # float32 bytes a token keeps per pass for a backward (inputs and outputs)
    chunk = 64 << 20
    head = shape["vocab"] * shape["hidden"]
    rtn_pass = RTN_PASS_TOKENS * shape["linear_params"] / max(1, shape["linear_params"] + head)
    for p in probes:
        s = base_settings(p)
        keys = [u.key for u in units if u.probe == p]
        if p == "fisher":
            tokens = 3 * n * t
            mem = n * t * act + 3 * 4 * shape["max_layer"] + 2 * chunk
        elif p == "hessian":
            tokens = (1 + 10 * (s["n_probes"] + s["power_iters"])) * min(t, s.get("seq_len") or t)
            mem = 8 * 4 * shape["linear_params"]
        elif p == "perturbation":
            tokens = (1 + len(s["sigmas"]) * len(keys)) * min(t, s["seq_len"] or t) * (s["n_windows"] or n)
            mem = 3 * 4 * shape["max_layer"] + chunk
        elif p == "outliers":
            tokens = 3 * 64 + 2000
            mem = chunk + 4 * shape["act_width"] * 64
        elif p in ("sqnr", "second_order"):
            tokens = rtn_pass * min(1.0, s["max_elements"] / max(1, shape["linear_params"])) * len(keys)
            mem = 4 * 4 * min(s["max_elements"], shape["linear_params"])
        elif p == "rtn_loss":
            ln, lt = loss_windows.ids.shape
            nw = min(ln, s["n_windows"] or ln)
            rounds = 2 if s.get("target_rel_se") is not None or s.get("target_abs_se") is not None else 1
            tokens = (nw + nw * len(keys)) * lt + rtn_pass * len(keys) * max(rounds, -(-nw // s["batch_size"]))
            mem = 3 * 4 * shape["max_layer"] + chunk
        else:  # pragma: no cover - every registered probe is listed
            tokens, mem = n * t, 0
        get_probe(p)
        est.seconds[p] = tokens * seconds_per_token
        est.bytes[p] = int(mem)
    return est


# A round-to-nearest pass over a model's linear layers costs about as much as a forward of this many
# tokens through those layers alone: both are linear in the weights, so the count holds across sizes
# (measured on SmolLM2-135M, one thread: a pass over its 106M linear weights took 0.15-0.5x a full
# 512-token forward, whose linear layers are 79% of the work, across int8, int4 g128, nf4 g64 and fp8,
# through probes._rtn.rtn_weight; docs/experiments.md)
RTN_PASS_TOKENS = 300.0


class Progress:
    """Per-probe progress lines with an ETA on stderr (``enabled``), from an ``Estimate``."""

    def __init__(self, est: Estimate, enabled: bool, stream=None):
        self.est, self.enabled, self.stream = est, enabled, stream or sys.stderr
        self.t0 = time.perf_counter()
        self.done: set[str] = set()

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def remaining(self, running: str | None = None, fraction: float = 0.0) -> float:
        left = sum(s for p, s in self.est.seconds.items() if p not in self.done and p != running)
        if running is not None:
            left += (1 - fraction) * self.est.seconds.get(running, 0.0)
        return left

    def start(self, probe: str) -> None:
        self.say(f"  probe {probe} (~{_fmt_s(self.est.seconds.get(probe, 0.0))}; ETA {_fmt_s(self.remaining())})")

    def step(self, probe: str) -> Callable[[str, int, int], None]:
        def report(what: str, done: int, total: int) -> None:
            self.say(f"  probe {probe}: {what} {done}/{total} (ETA {_fmt_s(self.remaining(probe, done / total))})")
        return report

    def finish(self, probe: str, seconds: float) -> None:
        self.done.add(probe)
        self.say(f"  probe {probe} done in {seconds:.1f}s")


# ---------------------------------------------------------------------------------------------------
def probe_features(loaded, calib, store: Store | None = None, seed: int = 0, loss_windows=None,
                   keys: list[str] | None = None, full: bool = False, progress: bool = False,
                   seconds_per_token: float | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Run (or reuse from ``store``) the probes a prediction for format ``keys`` needs; (features, provenance).

    Args:
        calib: the probes' windows (``Protocol.probe_windows``) for the landscape probes.
        loss_windows: windows for ``rtn_loss`` (the quantization calibration windows: their first
            ``RTN_LOSS_SETTINGS['n_windows']``); None = skip it (the predictor then falls back to the
            second-order estimate).
        keys: format keys (``probe_keys(specs)``); None = the default grid's.
        full: also every landscape probe and format (``units_for``): the sweep's training features.
        progress: print the cost estimate before probing and per-probe progress with an ETA (stderr).
        seconds_per_token: the device's measured forward speed (e.g. from the baseline evaluation);
            None = timed on one window.
    Returns:
        (features ``{"<probe>.<feature>": float}``, provenance: ``units`` (per probe: cached keys, run keys,
        seconds, the rtn_loss precision reached), ``estimate`` of what was run)
    """
    from advisor.probes import ProbeContext, run_probes

    keys = list(RTN_LOSS_KEYS) if keys is None else list(keys)
    units = [u for u in units_for(keys, full) if loss_windows is not None or not u.on_loss_windows]
    fp = loaded.source.fingerprint
    features: dict[str, float] = {}
    cached: list[Unit] = []
    missing: list[Unit] = []
    provenance: dict[str, Any] = {"probes": {}}
    for u in units:
        hit = store.probe(fp, unit_key(u, seed, (loss_windows if u.on_loss_windows else calib).protocol)) \
            if store is not None else None
        if hit is not None:
            features.update(hit["features"])
            cached.append(u)
        else:
            missing.append(u)
    if any(u.probe == "second_order" for u in missing) and not any(u.probe == "fisher" for u in missing):
        missing.append(Unit("fisher", None))  # its diagonal lives only in the process that computes it
    speed, source = (measured_speed(loaded, calib, seconds_per_token) if missing else (0.0, ""))
    est = estimate(loaded, missing, calib, loss_windows, speed) if missing else Estimate()
    est.speed_source = source
    show = Progress(est, progress)
    show.say(est.describe())
    provenance["estimate"] = {"seconds": est.seconds, "bytes": est.bytes, "seconds_per_token": speed,
                              "speed_source": source}
    provenance["cached"] = not missing
    context = ProbeContext()
    for probe in [p for p in ORDER if any(u.probe == p for u in missing)]:
        mine = [u for u in missing if u.probe == probe]
        windows = loss_windows if mine[0].on_loss_windows else calib
        settings = {probe: dict(base_settings(probe))}
        if probe in KEYED:
            settings[probe][KEYED[probe][0]] = [u.key for u in mine]
        context.progress = show.step(probe)
        show.start(probe)
        record = run_probes(loaded, windows, names=[probe], seed=seed, settings=settings, context=context)
        show.finish(probe, record.seconds)
        info = record.provenance["probes"][probe]
        provenance["probes"][probe] = {"run": [u.key for u in mine], "seconds": record.seconds,
                                       **{k: v for k, v in info.items() if k in ("precision", "n_windows", "n_tokens")}}
        prov = {k: v for k, v in record.provenance.items() if k != "probes"}
        parts = split_record(record, probe)
        for u in mine:
            feats = parts.get(u.key, {})
            features.update(feats)
            if store is not None and feats:
                store.add_probe(fp, unit_key(u, seed, windows.protocol), feats,
                                dict(prov, probe=probe, key=u.key, info=info.get("precision", {}).get(u.key)),
                                record.seconds / max(1, len(mine)))
    for u in cached:
        provenance["probes"].setdefault(u.probe, {}).setdefault("cached", []).append(u.key)
    return features, provenance


def cached_format_features(loaded, calib, store: Store, seed: int, loss_windows, keys: Iterable[str]
                           ) -> dict[str, float]:
    """The stored ``sqnr``, ``second_order`` and ``rtn_loss`` features of every format of ``keys`` whose three
    records are all in ``store`` (nothing is measured): the measured neighbours a prediction is made
    consistent with (``advisor.orderings``)."""
    features: dict[str, float] = {}
    fp = loaded.source.fingerprint
    for key in dict.fromkeys(keys):
        found = {}
        for unit in (Unit("sqnr", key), Unit("second_order", key), Unit("rtn_loss", key, on_loss_windows=True)):
            hit = store.probe(fp, unit_key(unit, seed, (loss_windows if unit.on_loss_windows else calib).protocol))
            if hit is None:
                break
            found.update(hit["features"])
        else:
            features.update(found)
    return features


def run_key(fingerprint: str, names: list[str], resolved: dict[str, dict[str, Any]], calibration: dict[str, Any],
            seed: int) -> dict[str, Any]:
    """The identity of an ``advisor probe`` run in the store: probes with versions and resolved settings,
    calibration protocol, seed (the model is the record's own column)."""
    from advisor.probes import get_probe

    return {"probe_format": PROBE_FORMAT, "command": "probe",
            "probes": {n: {"version": get_probe(n).version, "settings": resolved.get(n, {})} for n in names},
            "calibration": dict(calibration), "seed": seed}


def cached_run_probes(loaded, calib, store: Store, names: list[str] | None = None, seed: int = 0,
                      settings: dict[str, dict[str, Any]] | None = None, use_cache: bool = True):
    """``probes.run_probes`` through the store (what ``advisor probe`` runs): the whole ``FeatureRecord``,
    per-layer tables included, as one record keyed by ``run_key``.

    These records carry ``"predictor": False`` in their provenance: their settings are the caller's, so
    the fit's feature join (``fitting.stored_features``) leaves them out.
    Returns:
        (FeatureRecord, cached: bool)
    """
    from advisor.probes import PROBES, FeatureRecord, resolve_all_settings, run_probes

    names = list(PROBES) if names is None else list(dict.fromkeys(names))
    resolved = resolve_all_settings(names, settings)
    key = run_key(loaded.source.fingerprint, names, resolved, calib.protocol, seed)
    if use_cache:
        hit = store.probe(loaded.source.fingerprint, key)
        if hit is not None and "record" in hit["provenance"]:
            return FeatureRecord.from_dict(hit["provenance"]["record"]), True
    record = run_probes(loaded, calib, names=names, seed=seed, settings=settings)
    store.add_model(loaded.source.fingerprint, loaded.source.name, family=loaded.family,
                    source_kind=loaded.source.kind, n_params=loaded.n_params(),
                    non_embedding_params=loaded.n_params(non_embedding=True), info=loaded.source.to_dict())
    store.add_probe(loaded.source.fingerprint, key, record.features,
                    {"predictor": False, "calibration": record.provenance.get("calibration"),
                     "record": record.to_dict()}, record.seconds)
    return record, False


def store_probes(session, specs: list[str] | None = None) -> None:
    """Sweep hook: probe one model fully (cached), and every format of the sweep's ``specs`` (off the
    grid too), so its runs can be joined with its features."""
    windows = session.protocol.probe_windows(session.loaded, exclude=session.eval)
    keys = list(dict.fromkeys([*RTN_LOSS_KEYS, *probe_keys(specs)])) if specs else None
    probe_features(session.loaded, windows, store=session.store, seed=session.protocol.seed,
                   loss_windows=session.calib, keys=keys, full=True)
