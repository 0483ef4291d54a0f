"""Build the predictor's shipped fitting data: sweep, table, fit, report.

    python benchmarks/build_shipped_data.py [--models zoo:all smollm2-135m] [--specs default] [--jobs 2]
    python benchmarks/build_shipped_data.py --refit-only   # steps 3-4 from the committed runs.csv
    python benchmarks/build_shipped_data.py --refit-only --add-runs benchmarks/results/predictor_blind_ptb_runs.csv

1. `advisor sweep` over the models and specs (resumable; the store is ADVISOR_HOME/measurements.sqlite
   unless --store is given), with probes;
2. `advisor.fitting.runs_table` -> advisor/data/runs.csv (columns: advisor/data/runs_columns.md);
3. fit + conformal calibration -> advisor/data/predictor.json;
4. the leave-one-family-out and transfer report -> benchmarks/results/predictor.json.

``--add-runs``: fitting tables measured elsewhere (``advisor sweep --export``, the blind benchmarks'
``*_runs.csv``) join the runs; a run already present (same model, spec, calibration and protocol) is
kept once. Rows of a transfer model (SmolLM2) are reported, never fitted on.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["zoo:all", "smollm2-135m"])
    p.add_argument("--specs", nargs="+", default=["default"])
    p.add_argument("--store", default=None)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--skip-sweep", action="store_true", help="only rebuild the table and fit from the store")
    p.add_argument("--refit-only", action="store_true",
                   help="refit and report from the committed advisor/data/runs.csv (a change of the predictor's "
                        "design; no store or model needed)")
    p.add_argument("--add-runs", nargs="+", default=[], metavar="RUNS.csv",
                   help="fitting tables to add to the runs (e.g. a blind benchmark's *_runs.csv)")
    args = p.parse_args(argv)

    from advisor.commands.sweep import expand_models, expand_specs
    import pandas as pd

    from advisor.fitting import SHIPPED_PREDICTOR, SHIPPED_RUNS, fit, read_runs, report, runs_table
    from advisor.probing import store_probes
    from advisor.store import open_store
    from advisor.sweep import Protocol, run_sweep
    from advisor.models.saving import atomic_write_text

    t0 = time.perf_counter()
    if args.refit_only:
        df = pd.read_csv(SHIPPED_RUNS)
    else:
        store = open_store(args.store)
        if not args.skip_sweep:
            summary = run_sweep(expand_models(args.models), expand_specs(args.specs), store, Protocol(),
                                jobs=args.jobs, on_model=store_probes)
            print(json.dumps(summary.to_dict(), indent=1), file=sys.stderr)
        df = runs_table(store)
    # zoo:default is the embedded copy of zoo:llama-xs (demos and tests measure it under its own
    # fingerprint): its runs would count llama-xs twice
    df = df[df["model"] != "zoo:default"].reset_index(drop=True)
    if args.add_runs:
        df = pd.concat([df] + [read_runs(f) for f in args.add_runs], ignore_index=True)
        df = df.drop_duplicates(["model_fp", "spec", "calib_hash", "protocol_hash"]).reset_index(drop=True)
    atomic_write_text(SHIPPED_RUNS, df.to_csv(index=False))
    predictor = fit(df)
    predictor.save(SHIPPED_PREDICTOR)
    rep = report(df, predictor=predictor)
    rep["seconds"] = time.perf_counter() - t0
    rep["n_runs"] = int(len(df))
    rep["models"] = sorted(df["model"].unique().tolist())
    out = ROOT / "benchmarks" / "results" / "predictor.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(rep, indent=1, default=str))
    print(json.dumps(rep, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
