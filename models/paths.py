"""Where the advisor keeps its files: ``ADVISOR_HOME`` (default ``~/.cache/advisor``)."""
from __future__ import annotations

import os
from pathlib import Path


def advisor_home() -> Path:
    """The advisor's data folder (zoo weights, measurement store, probe cache); created on demand."""
    home = Path(os.environ.get("ADVISOR_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "advisor")
    home = home.expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
