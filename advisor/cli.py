"""The `advisor` command line: a thin layer over the Python API.

Each subcommand lives in its own module ``advisor/commands/<name>.py`` exposing
``add_parser(subparsers)`` and ``run(args) -> int``; modules are imported lazily so ``advisor --help``
and ``advisor ls`` stay fast. Only this layer prints; library code returns data and logs.

Errors: an :class:`models.errors.AdvisorError` (or any other error caused by input) is printed as
one ``error: ...`` line with a non-zero exit, never a traceback; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any, Sequence

# name -> one-line help. Order is the order in `advisor --help`.
COMMANDS: dict[str, str] = {
    "recommend": "pick, run and verify the cheapest quantization predicted to meet a perplexity budget",
    "eval": "measure a model's perplexity by the standard protocol",
    "quantize": "quantize a model with one spec, save it packed, measure its perplexity",
    "export": "write a saved native model as compressed-tensors, GPTQ or GGUF (same codes, no re-quantizing)",
    "probe": "measure loss-landscape features (Hessian, Fisher, perturbation, outliers, SQNR)",
    "plan": "what fits in a memory budget and what quality at which cost, predicted; quantizes nothing",
    "predict": "predict the perplexity change of one or every candidate spec",
    "sweep": "quantize and measure many (model, spec) pairs into the measurement store (resumable)",
    "fit": "refit the predictor on measured runs and report its held-out accuracy",
    "zoo": "train and list the project's own small model families",
    "ls": "list registered models, dtypes, methods, probes or datasets",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="advisor",
        description="Predict which quantization keeps perplexity within budget at the lowest memory cost, "
        "then run and verify it.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"advisor.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_parser(p)
    return parser


def emit_json(obj: Any) -> None:
    """Print one strict JSON object (the only stdout output in --json mode; NaN/Infinity become null)."""
    from advisor.jsonio import dumps

    print(dumps(obj))


def _user_error_types() -> tuple[type[BaseException], ...]:
    from advisor.models.errors import AdvisorError

    return (AdvisorError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `advisor` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 1
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
    module = importlib.import_module(f"advisor.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's job is to turn every failure into a clear message
        if args.debug:
            raise
        user = isinstance(e, _user_error_types())
        code = getattr(e, "exit_code", 1)
        msg = str(e) if user else f"internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback"
        if isinstance(e, OSError) and not user:
            msg = f"{type(e).__name__}: {e}"
        print(f"error: {msg}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
