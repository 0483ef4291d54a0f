"""Where the advisor keeps its files: ``ADVISOR_HOME`` (default ``~/.cache/advisor``)."""
from __future__ import annotations

import os
from pathlib import Path


def advisor_home() -> Path:
    """The advisor's data folder (zoo weights, measurement store, probe cache); created on demand.

    Raises:
        AdvisorError: the folder cannot be created or written (a file in its place, a read-only or
            missing parent), naming ``ADVISOR_HOME`` and what to do.
    """
    from advisor.models.errors import AdvisorError

    given = os.environ.get("ADVISOR_HOME")
    home = Path(given or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "advisor").expanduser()
    where = f"ADVISOR_HOME={given}" if given else f"advisor's data folder {home} (set ADVISOR_HOME to move it)"
    try:
        home.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise AdvisorError(f"{where} is a file, not a folder; set ADVISOR_HOME to a writable folder") from None
    except OSError as e:
        raise AdvisorError(f"{where} cannot be created ({e.strerror or e}); set ADVISOR_HOME to a writable "
                           "folder") from None
    if not home.is_dir():
        raise AdvisorError(f"{where} is not a folder; set ADVISOR_HOME to a writable folder")
    probe = home / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise AdvisorError(f"{where} is not writable ({e.strerror or e}); set ADVISOR_HOME to a writable "
                           "folder") from None
    return home
