"""Strict JSON for every document the product writes: no NaN or Infinity (null instead), and a stamp that
says which advisor made it, when (UTC), at which confidence and under which measurement protocol.

Strict parsers (``JSON.parse``, ``jq --seq``, most non-Python clients) reject NaN; Python's ``json`` writes
it by default, so every document goes through :func:`dumps`. The documents' shape is described by
``docs/schema/advisor-output.schema.json`` (tests validate every command's output against it).
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` as plain JSON values: non-finite floats become None, numpy/torch scalars and arrays plain
    numbers and lists, objects with ``to_dict`` their dict, anything else its ``str``."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [finite(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "to_dict"):
        return finite(obj.to_dict())
    if hasattr(obj, "tolist"):  # numpy / torch arrays and scalars
        return finite(obj.tolist())
    if hasattr(obj, "item"):
        return finite(obj.item())
    return str(obj)


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`finite`); raises if anything non-finite slipped through."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def advisor_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("advisor")
    except PackageNotFoundError:
        return "unknown"


def protocol_fingerprint(eval_protocol: dict | None, calibration: dict | None = None) -> str | None:
    """One short hash of what was measured: the evaluation windows' protocol and the calibration's (None
    when the document measured under neither)."""
    if not eval_protocol and not calibration:
        return None
    from advisor.store import protocol_key, stable_hash

    return stable_hash({"eval": protocol_key(eval_protocol or {}), "calibration": protocol_key(calibration or {})})


def document(obj: dict[str, Any], *, confidence: float | None, eval_protocol: dict | None = None,
             calibration: dict | None = None) -> dict[str, Any]:
    """``obj`` with the stamp every document carries: ``advisor_version``, ``created`` (UTC, ISO 8601),
    ``confidence`` (of the intervals it reports; None where it reports none) and ``protocol_fingerprint``."""
    stamp = {"advisor_version": advisor_version(),
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
             "confidence": confidence, "protocol_fingerprint": protocol_fingerprint(eval_protocol, calibration)}
    return {**stamp, **obj}
