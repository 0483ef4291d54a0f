"""Probe features for the predictor, cached in the measurement store by model, settings and calibration."""
from __future__ import annotations

from typing import Any

from advisor.features import PROBE_SETTINGS
from advisor.store import Store, protocol_key

PROBE_FORMAT = 1  # bump when probe definitions change, so stale cached features are not reused


def probe_windows(loaded, calib_data: str, exclude=None, seed: int = 0):
    """The probes' own (small) calibration windows, cut from the calibration corpus."""
    from models.data import calibration_windows, load_corpus
    from probes import DEFAULT_CALIB_SEQ_LEN, DEFAULT_N_CALIB

    seq = min(DEFAULT_CALIB_SEQ_LEN, loaded.adapter.max_context or DEFAULT_CALIB_SEQ_LEN)
    return calibration_windows(loaded.tokenizer, load_corpus(calib_data), DEFAULT_N_CALIB, seq, seed=seed,
                               exclude=exclude, max_context=loaded.adapter.max_context)


def probe_features(loaded, calib, store: Store | None = None, seed: int = 0) -> tuple[dict[str, float], dict[str, Any]]:
    """Run (or reuse from ``store``) every probe on ``calib`` windows; returns (features, provenance)."""
    from probes import run_probes

    settings = {"probe_format": PROBE_FORMAT, "settings": PROBE_SETTINGS, "seed": seed,
                "calibration": protocol_key(calib.protocol)}
    fp = loaded.source.fingerprint
    if store is not None:
        cached = store.probe(fp, settings)
        if cached is not None:
            return cached["features"], dict(cached["provenance"], cached=True)
    record = run_probes(loaded, calib, seed=seed, settings=PROBE_SETTINGS)
    features = {k: float(v) for k, v in record.features.items()}
    provenance = dict(record.provenance) if hasattr(record, "provenance") else {}
    if store is not None:
        store.add_probe(fp, settings, features, provenance, getattr(record, "seconds", None))
    return features, provenance


def store_probes(session) -> None:
    """Sweep hook: probe one model (cached) so its runs can be joined with its features."""
    windows = probe_windows(session.loaded, session.protocol.calib_data, exclude=session.eval,
                            seed=session.protocol.seed)
    probe_features(session.loaded, windows, store=session.store, seed=session.protocol.seed)
