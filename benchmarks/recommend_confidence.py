"""Offline: how `--confidence` and the exploration stage trade agreement with brute force against attempts.

    python benchmarks/recommend_confidence.py [--runs advisor/data/runs.csv] [--explore -1 0 0.5]

For every zoo model of the fitting data and budgets dPPL <= 1/3/10%, replays recommend's search
(`advisor.api.search_cheapest_verified`, the same function) with the leave-one-family-out predictor at
several confidences, using the sweep's measured dL as the verification (fake-quant = packed within
float rounding, tests/test_pipeline.py), up to 3 attempts, with and without the exploration of
cheaper plausible candidates after a verified pass. It matched the real benchmark exactly (zoo
agreement 0.923 with the default: decide at 0.9, explore where the median passes), so it is a cheap
stand-in for rerunning benchmarks/recommend.py at other settings. Cost order here is bits per weight
then solver compute, which equals recommend's byte order within one model.

``--transfer`` also replays the real model held out of fitting (SmolLM2-135M: the predictor fitted on
the whole zoo, as shipped), each evaluation text a separate case set. The shipped design (format 6)
guards extrapolated method gains; ``--no-method-guard`` replays format 4's intervals instead (the
variant ``method_guard=False`` of benchmarks/_predictor_variants.py), so the guard's effect on decisions
is measured on the same cases; ``--method-log-r`` replays format 4 with a per-method slope on log R (tried,
not shipped: docs/experiments.md). ``--out`` records the table as JSON.
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
    p.add_argument("--explore", nargs="+", type=float, default=[-1.0, 0.0],
                   help="after a verified pass, try cheaper candidates whose upper bound at this coverage "
                        "meets the budget (0: the median, recommend's default; -1: no exploration)")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--transfer", action="store_true", help="also replay the transfer model (fitted on the zoo)")
    p.add_argument("--no-method-guard", action="store_true",
                   help="intervals of format 4: no guard on extrapolated method gains")
    p.add_argument("--method-log-r", action="store_true",
                   help="intervals of format 4 with a per-method slope on log R (not shipped)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    import numpy as np

    from advisor.api import search_cheapest_verified
    from advisor.candidates import METHOD_COMPUTE_RANK
    from advisor.fitting import SHIPPED_RUNS, fit, read_runs
    from benchmarks._predictor_variants import Variant, VariantPredictor

    design = Variant(method_guard=not (args.no_method_guard or args.method_log_r), method_log_r=args.method_log_r)
    df = read_runs(args.runs or SHIPPED_RUNS)
    transfer = df["prequantized_source"].fillna(0).astype(int) == 1
    zoo = df[~transfer]
    splits = [(zoo[zoo["group"] != g], zoo[zoo["group"] == g]) for g in zoo["group"].unique()]
    case_sets = {"zoo": zoo}
    if args.transfer and transfer.any():
        held = df[transfer]
        splits.append((zoo, held))
        case_sets["transfer"] = held
    upper = {}
    for train, test in splits:
        pred = fit(train, make=lambda: VariantPredictor(design=design))
        for conf in set(args.confidences) | set(args.explore):
            if conf >= 0:  # coverage 0: the interval shrinks to the median prediction
                for i, u in zip(test.index, pred.predict_interval(test, 1 - conf)[2] if conf > 0 else pred.predict(test)):
                    upper[(i, conf)] = u
    def replay(cases, conf: float, explore: float) -> dict:
        """recommend's search on every (model, evaluation text) x budget of ``cases``."""
        agree = first_ok = n = n_attempts = 0
        by = ["model", "eval_data"] if "eval_data" in cases else ["model"]
        for _, t in cases.groupby(by, dropna=False):
            t = t.assign(rank=t["method"].map(METHOD_COMPUTE_RANK)).sort_values(["bits_per_weight", "rank", "spec"])
            t = t.reset_index()
            dl = t["dl"].to_numpy()
            up = np.array([upper[(i, conf)] for i in t["index"]])
            plaus = np.array([upper[(i, explore)] for i in t["index"]]) if 0 <= explore < conf else None
            for frac in args.budgets:
                max_dl = math.log1p(frac)
                brute = t[t["dl"] <= max_dl].head(1)
                tried = []

                def measure(pos, reason, max_dl=max_dl, tried=tried):  # the sweep's measurement
                    tried.append(dl[pos] <= max_dl)
                    return tried[-1]

                plausible = plaus <= max_dl if plaus is not None else np.zeros(len(up), bool)
                best = search_cheapest_verified(up <= max_dl, plausible, args.max_attempts, plaus is not None, measure)
                first_ok += bool(tried and tried[0])
                rec = t["spec"].iloc[best] if best is not None else None
                n += 1
                n_attempts += len(tried)
                agree += bool(len(brute) and rec == brute["spec"].iloc[0])
        return {"confidence": conf, "explore_confidence": explore, "agreement": agree / n,
                "first_attempt_pass_rate": first_ok / n, "mean_attempts": n_attempts / n, "cases": n}

    out = [{"models": name, **replay(cases, conf, explore), "method_guard": design.method_guard,
            "method_log_r": design.method_log_r}
           for name, cases in case_sets.items() for conf in args.confidences for explore in args.explore]
    print(json.dumps(out, indent=1))
    if args.out:
        from advisor.models.saving import atomic_write_text

        cmd = "python benchmarks/recommend_confidence.py " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_text(args.out, json.dumps({"command": cmd, "results": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
