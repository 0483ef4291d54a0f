"""User-facing errors: the CLI prints their message and exits non-zero, never a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class AdvisorError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do.

    `exit_code` is what the CLI exits with (1 = bad input; other codes are documented per command).
    """

    exit_code = 1


class ModelNotFoundError(AdvisorError):
    """A model name, path or id that cannot be resolved or loaded."""


class DataError(AdvisorError):
    """A corpus that cannot be loaded or is too short for the requested protocol."""


def close_matches(name: str, known: Iterable[str], n: int = 3) -> str:
    """A ' did you mean ...?' suffix for an unknown registry key ('' if nothing is close)."""
    matches = difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def unknown_key_message(kind: str, name: str, known: Iterable[str]) -> str:
    """`unknown method 'gtpq'. Did you mean 'gptq'? Known: awq, gptq, ...` (architecture style guide)."""
    known = sorted(known)
    return f"unknown {kind} {name!r}.{close_matches(name, known)} Known: {', '.join(known)}."
