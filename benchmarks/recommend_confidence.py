"""Offline: how `--confidence` trades agreement with brute force against first-attempt passes.

    python benchmarks/recommend_confidence.py [--runs advisor/data/runs.csv]

For every zoo model of the fitting data and budgets dPPL <= 1/3/10%, replays recommend's decision
with the leave-one-family-out predictor at several confidences, using the sweep's measured dL as the
verification (fake-quant = packed within float rounding, tests/test_pipeline.py), up to 3 attempts.
At confidence 0.9 it reproduces benchmarks/recommend.py's agreement exactly (0.538 on 39 cases), so
it is a cheap stand-in for rerunning the real benchmark at other confidences. Cost order here is bits
per weight then solver compute, which equals recommend's byte order within one model.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=None)
    p.add_argument("--confidences", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.01, 0.03, 0.10])
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    from advisor.candidates import METHOD_COMPUTE_RANK
    from advisor.fitting import SHIPPED_RUNS, fit, read_runs

    df = read_runs(args.runs or SHIPPED_RUNS)
    zoo = df[df["prequantized_source"].fillna(0).astype(int) == 0]
    upper = {}
    for g in zoo["group"].unique():
        pred, test = fit(zoo[zoo["group"] != g]), zoo[zoo["group"] == g]
        for conf in args.confidences:
            for i, u in zip(test.index, pred.predict_interval(test, 1 - conf)[2]):
                upper[(i, conf)] = u
    out = []
    for conf in args.confidences:
        agree = first_ok = n = 0
        for _, t in zoo.groupby("model"):
            t = t.assign(rank=t["method"].map(METHOD_COMPUTE_RANK)).sort_values(["bits_per_weight", "rank", "spec"])
            for frac in args.budgets:
                max_dl = math.log1p(frac)
                brute = t[t["dl"] <= max_dl].head(1)
                passing = [r for i, r in t.iterrows() if upper[(i, conf)] <= max_dl]
                rec = next((r["spec"] for r in passing[:3] if r["dl"] <= max_dl), None)
                n += 1
                agree += bool(len(brute) and rec == brute["spec"].iloc[0])
                first_ok += bool(passing and passing[0]["dl"] <= max_dl)
        out.append({"confidence": conf, "agreement": agree / n, "first_attempt_pass_rate": first_ok / n, "cases": n})
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
