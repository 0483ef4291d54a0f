"""Probe features for the predictor, cached in the measurement store by model, settings and calibration.

Two bundles, cached separately so that adding one never invalidates the other's (costly) records:
- the landscape probes (Hessian, Fisher, perturbation, outliers, SQNR, second order) on the probes'
  own small windows (``probe_windows``);
- ``rtn_loss``, the measured loss increase of round-to-nearest at every format of the candidate
  grid, on the first windows of the quantization calibration set (the evaluation protocol's context
  length, since the loss increase depends on it).
"""
from __future__ import annotations

from typing import Any

from advisor.features import LANDSCAPE_PROBES, PROBE_SETTINGS, RTN_LOSS_SETTINGS
from advisor.store import Store, protocol_key

PROBE_FORMAT = 1  # bump when probe definitions change, so stale cached features are not reused


def _cached_bundle(loaded, windows, key: dict[str, Any], names: list[str], settings: dict, store: Store | None,
                   seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    from advisor.probes import run_probes

    fp = loaded.source.fingerprint
    if store is not None:
        cached = store.probe(fp, key)
        if cached is not None:
            return cached["features"], dict(cached["provenance"], cached=True)
    record = run_probes(loaded, windows, names=names, seed=seed, settings=settings)
    features = {k: float(v) for k, v in record.features.items()}
    provenance = dict(record.provenance) if hasattr(record, "provenance") else {}
    if store is not None:
        store.add_probe(fp, key, features, provenance, getattr(record, "seconds", None))
    return features, provenance


def probe_features(loaded, calib, store: Store | None = None, seed: int = 0, loss_windows=None
                   ) -> tuple[dict[str, float], dict[str, Any]]:
    """Run (or reuse from ``store``) the probes; returns (features, provenance).

    Args:
        calib: the probes' windows (``Protocol.probe_windows``) for the landscape probes.
        loss_windows: windows for ``rtn_loss`` (the quantization calibration windows: their first
            ``RTN_LOSS_SETTINGS['n_windows']``); None = skip it (the predictor then falls back to the
            second-order estimate).
    """
    key = {"probe_format": PROBE_FORMAT, "settings": PROBE_SETTINGS, "seed": seed,
           "calibration": protocol_key(calib.protocol)}  # unchanged since the first release: old records stay valid
    features, provenance = _cached_bundle(loaded, calib, key, list(LANDSCAPE_PROBES), PROBE_SETTINGS, store, seed)
    if loss_windows is not None:
        loss_key = {"probe_format": PROBE_FORMAT, "probes": ["rtn_loss"], "settings": RTN_LOSS_SETTINGS,
                    "seed": seed, "calibration": protocol_key(loss_windows.protocol)}
        more, prov = _cached_bundle(loaded, loss_windows, loss_key, ["rtn_loss"], RTN_LOSS_SETTINGS, store, seed)
        features = {**features, **more}
        provenance = {**provenance, "rtn_loss": prov}
    return features, provenance


def store_probes(session) -> None:
    """Sweep hook: probe one model (cached) so its runs can be joined with its features."""
    windows = session.protocol.probe_windows(session.loaded, exclude=session.eval)
    probe_features(session.loaded, windows, store=session.store, seed=session.protocol.seed,
                   loss_windows=session.calib)
