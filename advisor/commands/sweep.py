"""`advisor sweep`: measure every (model, spec) pair not yet in the store; resumable, parallel."""
from __future__ import annotations

import argparse
import sys


def add_parser(p: argparse.ArgumentParser) -> None:
    from advisor.commands._common import add_protocol_args

    p.add_argument("--models", nargs="+", required=True,
                   help="models to sweep; zoo:all expands to every model of the zoo manifest")
    p.add_argument("--specs", nargs="+", default=["default"],
                   help="spec strings, or 'default' for the default candidate grid")
    p.add_argument("--store", default=None, help="measurement store (default ADVISOR_HOME/measurements.sqlite)")
    add_protocol_args(p)
    p.add_argument("--device", default="cpu", help="torch device each model is loaded on (default cpu)")
    p.add_argument("--jobs", type=int, default=1,
                   help="parallel worker processes, default 1 (--engine ray on a new local instance: tasks at once)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default): this process and --jobs worker processes on this machine; ray: every "
                        "model's preparation (baseline, probes) and every (model, spec) measurement is a Ray task, "
                        "and this process writes their results to the store as they finish (needs advisor[ray]; "
                        "see docs/sweeps.md)")
    p.add_argument("--address", default=None,
                   help="with --engine ray: the Ray cluster to run on (auto, HOST:PORT or ray://HOST:10001); default "
                        "RAY_ADDRESS, or a new Ray instance on this machine")
    p.add_argument("--cpus-per-task", type=float, default=None,
                   help="with --engine ray: CPUs (torch threads) each task declares (default cores/--jobs on a new "
                        "local instance, 1 on a cluster)")
    p.add_argument("--gpus-per-task", type=float, default=None,
                   help="with --engine ray: GPUs each task declares (default 1 with --device cuda, else 0)")
    p.add_argument("--retry-failed", action="store_true", help="re-measure pairs recorded as failed")
    p.add_argument("--no-probes", action="store_true", help="do not run and store probe features")
    p.add_argument("--export", default=None,
                   help="after the sweep, write the fitting table (every ok run with its model's probe features: "
                        "what `advisor fit --runs` reads) to this CSV/parquet file")
    p.add_argument("--export-raw", default=None,
                   help="after the sweep, export the store's runs as recorded (every status, no features) to this "
                        "CSV/parquet file")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def expand_models(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if n == "zoo:all":
            from advisor.models.zoo import zoo_names

            out += [f"zoo:{z}" for z in zoo_names(present_only=True)]
        else:
            out.append(n)
    return list(dict.fromkeys(out))


def expand_specs(specs: list[str]) -> list[str]:
    from advisor.candidates import DEFAULT_SPECS

    out: list[str] = []
    for s in specs:
        out += list(DEFAULT_SPECS) if s == "default" else [s]
    return list(dict.fromkeys(out))


def run(args: argparse.Namespace) -> int:
    from advisor.cli import emit_json
    from advisor.store import open_store
    from advisor.commands._common import protocol_from
    from advisor.sweep import SweepProtocol, run_sweep
    from advisor.models.errors import AdvisorError

    if args.jobs < 1:
        raise AdvisorError(f"--jobs must be at least 1, got {args.jobs}")
    if args.engine != "ray" and (args.address or args.cpus_per_task is not None or args.gpus_per_task is not None):
        raise AdvisorError("--address, --cpus-per-task and --gpus-per-task need --engine ray")
    if args.cpus_per_task is not None and not args.cpus_per_task > 0:
        raise AdvisorError(f"--cpus-per-task must be positive, got {args.cpus_per_task}")
    if args.gpus_per_task is not None and not args.gpus_per_task >= 0:
        raise AdvisorError(f"--gpus-per-task must be 0 or more, got {args.gpus_per_task}")
    if args.engine == "ray":
        from advisor.sweep_ray import _import_ray

        _import_ray()  # a missing extra is said before any store or model is opened
    protocol = SweepProtocol(**protocol_from(args).to_dict(), device=args.device)
    specs = expand_specs(args.specs)
    from advisor.quantizers import QuantSpec

    for s in specs:  # every spec before the store is opened or a model loaded
        try:
            QuantSpec.parse(s)
        except ValueError as e:
            raise AdvisorError(f"--specs {s[:80]!r}: {e}") from None
    store = open_store(args.store)
    on_model = None
    specs = expand_specs(args.specs)
    if not args.no_probes:
        from functools import partial

        from advisor.probing import store_probes

        on_model = partial(store_probes, specs=specs)  # every swept format, off the grid too
    summary = run_sweep(expand_models(args.models), specs, store, protocol, jobs=args.jobs,
                        retry_failed=args.retry_failed, on_model=on_model, engine=args.engine, address=args.address,
                        engine_options=dict(cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task))
    out = dict(summary.to_dict(), store=str(store.path), runs_in_store=store.count_runs())
    if args.export:
        from advisor.fitting import export_runs_table

        path, n, left_out = export_runs_table(store, args.export)
        out.update(export=str(path), exported_rows=n, exported_left_out=left_out)
        if left_out:
            print(f"export: {left_out} runs left out: their models have no stored probes (swept with "
                  "--no-probes?); rerun the sweep without --no-probes to probe them", file=sys.stderr)
    if args.export_raw:
        out["export_raw"] = str(store.export(args.export_raw))
    if args.json:
        from advisor.jsonio import document

        # one sweep measures several models, each on its own tokenizer's windows: no single fingerprint
        emit_json(document(out, confidence=None))
    else:
        print(f"sweep: {summary.done} measured, {summary.skipped} already in the store, {summary.failed} failed "
              f"in {summary.seconds:.0f}s; store {store.path} now holds {out['runs_in_store']} runs")
        for e in summary.errors[:10]:
            print(f"  failed: {e}")
    return 0
