"""A predictor design on the pooled runs of several blind checks, as a pre-registered rule reads it.

    python benchmarks/predictor_blind_pooled.py --design method_guard \
        --names shakespeare vimmanual nodejsdocs

Reads each check's fitting table (``benchmarks/results/predictor_blind_<name>_runs.csv``, written by
``predictor_blind_protocol.py``), fits format 4 (the variant ``method_guard=False`` of
benchmarks/_predictor_variants.py) and format 4 with the option switched on to the shipped runs (``advisor/data/runs.csv``, the transfer model left out, exactly
as ``advisor fit`` does) and reports the error and 90% coverage of both per text and pooled over all of
them. The pre-registered rule (docs/experiments.md) read the pooled line over the runs measured after the
design was frozen: coverage within 85-95% and median err/target at most 1. ``method_guard`` passed it
(91.0%, 0.88) and ships.
Writes benchmarks/results/predictor_blind_pooled_<design>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--design", required=True, help="a boolean option of benchmarks/_predictor_variants.Variant, e.g. method_guard")
    p.add_argument("--names", nargs="+", required=True, help="blind checks (predictor_blind_<name>_runs.csv)")
    args = p.parse_args(argv)

    import numpy as np
    import pandas as pd

    from advisor.fitting import fit, read_runs, shipped_runs
    from advisor.predictor import PredictorError, error_report
    from benchmarks._predictor_variants import Variant, VariantPredictor
    from advisor.models.saving import atomic_write_text

    if not isinstance(getattr(Variant(), args.design, None), bool):
        raise SystemExit(f"--design {args.design}: not a boolean option of benchmarks._predictor_variants.Variant")
    parts = []
    for name in args.names:
        path = RESULTS / f"predictor_blind_{name}_runs.csv"
        try:
            parts.append(read_runs(path).assign(blind_check=name))
        except PredictorError as e:
            raise SystemExit(f"{e}\nrun benchmarks/predictor_blind_protocol.py --name {name} first") from None
    runs = pd.concat(parts, ignore_index=True)
    # format 4 as frozen (the shipped design when the rule was registered; refit, same coefficients)
    base = Variant(method_guard=False)
    on = replace(base, **{args.design: True})
    predictors = {"format4": fit(shipped_runs(), make=lambda: VariantPredictor(design=base)),
                  args.design: fit(shipped_runs(), make=lambda: VariantPredictor(design=on))}
    out: dict = {"command": "python benchmarks/predictor_blind_pooled.py " + " ".join(argv or sys.argv[1:]),
                 "design": args.design, "names": args.names}
    for label, pred in predictors.items():
        mean, lo, up = pred.predict_interval(runs, 0.1)
        rows = {}
        for name in [*args.names, "pooled"]:
            m = np.ones(len(runs), bool) if name == "pooled" else (runs["blind_check"] == name).to_numpy()
            rep = error_report(runs["dl"].to_numpy()[m], mean[m], lo[m], up[m], runs["baseline_ppl"].to_numpy()[m])
            rep["covered"] = int(round(rep["coverage90"] * rep["n_runs"]))
            rows[name] = rep
            print(f"{label:14s} {name:14s} runs {rep['n_runs']:4d}  covered {rep['covered']:4d} "
                  f"({rep['coverage90']:.1%})  median err/target {rep['median_err_over_target']:.2f}  "
                  f"median abs err {rep['median_abs_err_dl']:.3f} nats")
        out[label] = rows
    atomic_write_text(RESULTS / f"predictor_blind_pooled_{args.design}.json", json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
