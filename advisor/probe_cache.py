"""Cache of probe feature records: JSON files under ``ADVISOR_HOME/probes/``.

Key: sha256 of the model fingerprint, the probes run (names, versions, resolved settings), the
calibration protocol (corpus sha256, tokenizer, windows, seed) and the seed. Anything that changes a
feature changes the key, so entries never need invalidation; delete the folder to reclaim space.
Writes are atomic (temporary file in the same folder, then ``os.replace``), so a crash or a
concurrent writer never leaves a truncated entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    from advisor.models.paths import advisor_home

    folder = advisor_home() / "probes"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_key(fingerprint: str, names: list[str], settings: Mapping[str, Mapping[str, Any]],
              calib_protocol: Mapping[str, Any], seed: int) -> str:
    """Hex key of one probe run (see module docstring)."""
    from advisor.probes import get_probe
    from advisor.probes.base import FORMAT_VERSION

    payload = {
        "format": FORMAT_VERSION,
        "model": fingerprint,
        "probes": {n: {"version": get_probe(n).version, "settings": settings.get(n, {})} for n in names},
        "calibration": dict(calib_protocol),
        "seed": seed,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def load(key: str) -> dict[str, Any] | None:
    """The cached record dict, or ``None`` when absent or unreadable (a corrupt entry is ignored)."""
    path = cache_dir() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable probe cache entry %s: %s", path, e)
        return None


def save(key: str, record: Mapping[str, Any]) -> Path:
    """Write ``record`` atomically as ``<key>.json``; returns the path."""
    folder = cache_dir()
    path = folder / f"{key}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, sort_keys=True, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cached_run_probes(loaded, calib, names: list[str] | None = None, seed: int = 0,
                      settings: Mapping[str, Mapping[str, Any]] | None = None, use_cache: bool = True):
    """``probes.run_probes`` through the cache.

    Returns:
        (FeatureRecord, cached: bool)
    """
    from advisor.probes import PROBES, FeatureRecord, resolve_all_settings, run_probes

    names = list(PROBES) if names is None else list(dict.fromkeys(names))
    resolved = resolve_all_settings(names, settings)
    key = cache_key(loaded.source.fingerprint, names, resolved, calib.protocol, seed)
    if use_cache:
        hit = load(key)
        if hit is not None:
            record = FeatureRecord.from_dict(hit)
            record.provenance["cache_key"] = key
            return record, True
    record = run_probes(loaded, calib, names=names, seed=seed, settings=settings)
    record.provenance["cache_key"] = key
    save(key, record.to_dict())
    return record, False
