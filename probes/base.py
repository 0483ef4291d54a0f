"""Core types of the probes: ``Probe``, ``ProbeResult``, ``FeatureRecord`` and the probe registry.

A probe measures one aspect of a model's local loss landscape on calibration windows and returns
model-level features (a flat ``{name: float}``) plus a per-layer table. ``run_probes`` runs several
probes on one model and merges their results into a ``FeatureRecord`` whose keys are
``"<probe>.<feature>"``, with the provenance needed to reproduce or cache it (model fingerprint,
calibration protocol, resolved settings, seed, library versions, seconds per probe).

Probes share expensive intermediates (the Fisher diagonal, RTN errors) through a ``ProbeContext``
that lives for one ``run_probes`` call; every probe also runs on its own, computing what it needs.
"""
from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pandas as pd

from advisor.models.data import Windows
from advisor.models.errors import AdvisorError, unknown_key_message

log = logging.getLogger(__name__)

# Default calibration protocol of the probes: few, short windows (cost must stay below one baseline
# perplexity evaluation of the model; see docs/probes.md).
DEFAULT_CALIB = "stdlib-code:calib"
DEFAULT_N_CALIB = 8
DEFAULT_CALIB_SEQ_LEN = 128
FORMAT_VERSION = 2  # bump when the meaning of any feature changes (invalidates every cached probe record)


@dataclass
class ProbeResult:
    """What one probe measured.

    Attributes:
        probe: the probe's registry name.
        features: model-level features, unprefixed (``"trace"``, not ``"hessian.trace"``); finite floats.
        per_layer: one row per linear layer (column ``layer`` = full module name) or, for probes that
            are not per layer (``perturbation``), one row per measured point.
        settings: the resolved settings used.
        seconds: wall time of ``run``.
        info: extra provenance (windows used, estimator notes).
    """

    probe: str
    features: dict[str, float]
    per_layer: pd.DataFrame
    settings: dict[str, Any]
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeContext:
    """Scratch space shared by the probes of one ``run_probes`` call (not serialized).

    ``cache`` holds e.g. ``"fisher.diag"`` (layer name -> (out, in) float32 Fisher diagonal) and RTN
    errors of sampled rows, so ``second_order`` reuses ``fisher`` and ``sqnr``'s work.
    ``settings`` holds every probe's overrides, so a probe that computes another's output on demand
    uses the same settings.
    """

    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)
    # called as progress(step, done, total) by probes with several steps (rtn_loss: one per format)
    progress: Callable[[str, int, int], None] | None = None


class Probe:
    """Base class: subclasses set ``name``, ``description``, ``version``, ``defaults`` and implement ``_run``."""

    name: str = ""
    description: str = ""
    version: str = "1"
    defaults: dict[str, Any] = {}

    def resolve_settings(self, settings: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults overridden by ``settings``.

        Raises:
            AdvisorError: an unknown setting name (lists the known ones).
        """
        merged = dict(self.defaults)
        for key, value in (settings or {}).items():
            if key not in self.defaults:
                raise AdvisorError(unknown_key_message(f"setting of probe {self.name!r}", key, self.defaults))
            merged[key] = value
        return merged

    def run(self, loaded, calib: Windows, *, seed: int = 0, settings: Mapping[str, Any] | None = None,
            context: ProbeContext | None = None) -> ProbeResult:
        """Measure this probe's features.

        Args:
            loaded: a ``models.loading.LoadedModel`` (model, tokenizer, adapter, source).
            calib: calibration windows ``(n, seq_len)``; probes use all or the first few of them.
            seed: seeds every random draw (probe vectors, noise, row samples).
            settings: overrides of ``defaults``.
            context: shared scratch space (a fresh one when ``None``).
        Raises:
            AdvisorError: no linear layers, empty calibration set, unknown setting.
        """
        from advisor.probes._util import check_inputs

        resolved = self.resolve_settings(settings)
        check_inputs(loaded, calib)
        context = context if context is not None else ProbeContext()
        context.settings.setdefault(self.name, dict(settings or {}))
        t0 = time.perf_counter()
        result = self._run(loaded, calib, seed=seed, settings=resolved, context=context)
        result.seconds = time.perf_counter() - t0
        result.settings = resolved
        return result

    def _run(self, loaded, calib: Windows, *, seed: int, settings: dict[str, Any],
             context: ProbeContext) -> ProbeResult:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------
def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def frame_to_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A per-layer frame as JSON-safe records (NaN/Inf -> None, numpy scalars -> Python)."""
    records = frame.to_dict(orient="records")
    return [{str(k): _finite_or_none(v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in records]


@dataclass
class FeatureRecord:
    """Merged features of several probes.

    Attributes:
        features: ``{"<probe>.<feature>": float}``, every value finite (a non-finite value is dropped
            and its key listed in ``provenance["dropped_nonfinite"]``).
        per_layer: probe name -> its per-layer frame.
        provenance: model, calibration protocol, settings, seed, versions, seconds per probe.
        seconds: total wall time.
    """

    features: dict[str, float]
    per_layer: dict[str, pd.DataFrame]
    provenance: dict[str, Any]
    seconds: float

    @classmethod
    def merge(cls, results: list[ProbeResult], provenance: dict[str, Any], seconds: float) -> "FeatureRecord":
        features: dict[str, float] = {}
        dropped = []
        for r in results:
            for key, value in r.features.items():
                full = f"{r.probe}.{key}"
                value = float(value)
                if math.isfinite(value):
                    features[full] = value
                else:
                    dropped.append(full)
        if dropped:
            log.warning("dropped non-finite features: %s", ", ".join(dropped))
        provenance = dict(provenance, dropped_nonfinite=dropped)
        return cls(features=features, per_layer={r.probe: r.per_layer for r in results},
                   provenance=provenance, seconds=seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"features": dict(self.features),
                "per_layer": {k: frame_to_records(v) for k, v in self.per_layer.items()},
                "provenance": self.provenance, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureRecord":
        return cls(features={k: float(v) for k, v in d["features"].items()},
                   per_layer={k: pd.DataFrame.from_records(v) for k, v in d.get("per_layer", {}).items()},
                   provenance=dict(d.get("provenance", {})), seconds=float(d.get("seconds", 0.0)))


# ---------------------------------------------------------------------------------------------------
PROBES: dict[str, Probe] = {}


def register(probe: Probe) -> Probe:
    if not probe.name or not probe.description:
        raise ValueError("a probe needs a name and a one-line description")
    PROBES[probe.name] = probe
    return probe


def get_probe(name: str) -> Probe:
    """Look up a probe by name.

    Raises:
        AdvisorError: unknown name, with close matches and the list of known probes.
    """
    if name not in PROBES:
        raise AdvisorError(unknown_key_message("probe", name, PROBES))
    return PROBES[name]


def versions() -> dict[str, str]:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "probes_format": str(FORMAT_VERSION)}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass
    return out


def resolve_all_settings(names: list[str], settings: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Every named probe's resolved settings (validates unknown probes and settings)."""
    settings = dict(settings or {})
    for key in settings:
        get_probe(key)
    return {n: get_probe(n).resolve_settings(settings.get(n)) for n in names}


def run_probes(loaded, calib: Windows, names: list[str] | None = None, seed: int = 0,
               settings: Mapping[str, Mapping[str, Any]] | None = None,
               context: ProbeContext | None = None) -> FeatureRecord:
    """Run several probes (default: all registered) and merge them into one ``FeatureRecord``.

    Args:
        loaded: ``LoadedModel``.
        calib: calibration windows (see ``DEFAULT_N_CALIB`` / ``DEFAULT_CALIB_SEQ_LEN``).
        names: probe names in the order to run them (``fisher`` before ``second_order`` shares work).
        seed: seeds every probe.
        settings: ``{probe name: {setting: value}}`` overrides.
        context: shared scratch space to use (e.g. with a ``progress`` callback, or one that already
            holds intermediates of the same windows); a fresh one when ``None``.
    Raises:
        AdvisorError: unknown probe or setting, no linear layers, empty calibration set.
    """
    from advisor.probes._util import check_inputs

    names = list(PROBES) if names is None else list(dict.fromkeys(names))
    if not names:
        raise AdvisorError(f"no probes selected; known: {', '.join(PROBES)}")
    resolved = resolve_all_settings(names, settings)
    check_inputs(loaded, calib)
    if context is None:
        context = ProbeContext()
    context.settings.update({k: dict(v) for k, v in (settings or {}).items()})
    t0 = time.perf_counter()
    results = []
    for name in names:
        log.info("probe %s ...", name)
        results.append(get_probe(name).run(loaded, calib, seed=seed, settings=resolved[name], context=context))
        log.info("probe %s: %.1fs", name, results[-1].seconds)
    seconds = time.perf_counter() - t0
    provenance = {
        "model": loaded.source.to_dict() if hasattr(loaded.source, "to_dict") else str(loaded.source),
        "calibration": dict(calib.protocol, n_windows=len(calib), seq_len=int(calib.ids.shape[1])),
        "seed": seed,
        "probes": {r.probe: {"version": get_probe(r.probe).version, "settings": r.settings,
                             "seconds": r.seconds, **r.info} for r in results},
        "versions": versions(),
    }
    return FeatureRecord.merge(results, provenance, seconds)
