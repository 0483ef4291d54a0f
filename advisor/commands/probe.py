"""`advisor probe`: loss-landscape features of a model on calibration data (cached in the measurement store)."""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

from advisor.commands._common import add_json_arg, add_model_args, load_model


# Same values as probes.base (not imported here: `advisor --help` must not import torch); a test checks.
DEFAULT_CALIB, DEFAULT_N_CALIB, DEFAULT_CALIB_SEQ_LEN = "stdlib-code:calib", 8, 128


def add_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--calib", default=DEFAULT_CALIB,
                   help=f"calibration corpus (default {DEFAULT_CALIB}; see `advisor ls datasets`)")
    p.add_argument("--probes", default=None,
                   help="comma-separated probes (default all; see `advisor ls probes`)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration offsets and every probe (default 0)")
    p.add_argument("--n-calib", type=int, default=DEFAULT_N_CALIB,
                   help=f"calibration windows (default {DEFAULT_N_CALIB})")
    p.add_argument("--calib-seq-len", type=int, default=DEFAULT_CALIB_SEQ_LEN,
                   help=f"tokens per calibration window (default {DEFAULT_CALIB_SEQ_LEN})")
    from advisor.protocol import BOS_MODES, DEFAULT

    p.add_argument("--bos", choices=BOS_MODES, default=DEFAULT.bos,
                   help=f"beginning-of-sequence convention of the windows, as in every measuring command "
                        f"(default {DEFAULT.bos})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PROBE.KEY=VALUE",
                   help="override a probe setting, value in JSON (repeatable), e.g. --set hessian.n_probes=8")
    p.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
    p.add_argument("--store", default=None,
                   help="measurement store (SQLite) that caches the result (default: ADVISOR_HOME/measurements.sqlite)")
    add_json_arg(p)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["hessian.n_probes=8"] -> {"hessian": {"n_probes": 8}}`` (values parsed as JSON, else strings)."""
    from advisor.models.errors import AdvisorError

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        probe, dot, name = key.partition(".")
        if not sep or not dot or not probe or not name:
            raise AdvisorError(f"--set {item!r}: expected PROBE.KEY=VALUE, e.g. hessian.n_probes=8")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(probe, {})[name] = value
    return out


def run(args: argparse.Namespace) -> int:
    from advisor.cli import emit_json
    from advisor.probing import cached_run_probes
    from advisor.store import open_store
    from advisor.models.data import calibration_windows, load_corpus
    from advisor.protocol import model_vocab_size
    from advisor.probes import PROBES, get_probe, resolve_all_settings

    t0 = time.perf_counter()
    names = [n.strip() for n in args.probes.split(",") if n.strip()] if args.probes else list(PROBES)
    for n in names:
        get_probe(n)  # fail fast, before loading anything
    settings = parse_overrides(args.overrides)
    resolve_all_settings(names, settings)
    corpus = load_corpus(args.calib)
    loaded = load_model(args, job="probe")
    calib = calibration_windows(loaded.tokenizer, corpus, args.n_calib, args.calib_seq_len, seed=args.seed,
                                max_context=loaded.adapter.max_context, bos=args.bos,
                                vocab_size=model_vocab_size(loaded))
    record, cached = cached_run_probes(loaded, calib, open_store(args.store), names=names, seed=args.seed,
                                       settings=settings, use_cache=not args.no_cache)
    out = record.to_dict()
    out["cached"] = cached
    out["total_seconds"] = time.perf_counter() - t0
    if args.json:
        from advisor.jsonio import document

        emit_json(document(out, confidence=None, calibration=calib.protocol))
        return 0
    print(f"{args.model}: {len(record.features)} features from {', '.join(names)} on {len(calib)} x "
          f"{args.calib_seq_len} tokens of {args.calib} ({'cached' if cached else f'{record.seconds:.1f}s'})")
    width = max(len(k) for k in record.features) if record.features else 0
    for key, value in record.features.items():
        print(f"  {key:<{width}}  {value:.6g}")
    return 0
