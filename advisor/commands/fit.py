"""`advisor fit`: refit the predictor on measured runs; `--report` gives held-out accuracy."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="*", default=[], help="runs CSV files (from `advisor sweep --export`)")
    p.add_argument("--store", default=None, help="also use every run in this measurement store")
    p.add_argument("--with-shipped", action="store_true", help="add the shipped fitting data")
    p.add_argument("--out", default=None, help="write the fitted predictor (JSON) here")
    p.add_argument("--report", action="store_true", help="leave-one-family-out and transfer accuracy")
    p.add_argument("--confidence", type=float, default=0.9, help="interval coverage for the report (default 0.9)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from advisor.cli import emit_json
    from advisor.fitting import fit, read_runs, report, runs_table, shipped_runs
    from advisor.predictor import PredictorError
    from advisor.models.errors import AdvisorError

    if not 0.5 <= args.confidence < 1:
        raise AdvisorError(f"--confidence must be in [0.5, 1), got {args.confidence}")

    frames = [read_runs(p) for p in args.runs]
    if args.store:
        from advisor.store import open_store

        frames.append(runs_table(open_store(args.store)))
    if args.with_shipped or not frames:
        frames.append(shipped_runs())
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise PredictorError("no runs to fit on")
    import time

    t0 = time.perf_counter()
    out: dict = {"n_runs": int(len(df)), "n_groups": int(df["group"].nunique())}
    predictor = fit(df)
    out["seconds"] = time.perf_counter() - t0  # fit + conformal calibration (not the report)
    out["n_fitted"] = int(predictor.n_train_)  # runs of models pre-quantized at the source are transfer tests only
    if args.out:
        out["saved_to"] = str(predictor.save(args.out))
    if args.report:
        out.update(report(df, alpha=1 - args.confidence, predictor=predictor))  # --confidence checked in run()
    if args.json:
        from advisor.jsonio import document

        # a fit pools runs of many protocols: no single fingerprint; the report's intervals are at --confidence
        emit_json(document(out, confidence=args.confidence if args.report else None))
        return 0
    held = out["n_runs"] - out["n_fitted"]
    print(f"fitted on {out['n_fitted']} of {out['n_runs']} runs" +
          (f" ({held} runs of models pre-quantized at the source are kept out: transfer tests only)" if held else "") +
          (f"; saved to {out['saved_to']}" if args.out else ""))
    for part in ("lofo", "transfer"):
        r = out.get(part)
        if r:
            print(f"{part}: median |err dL| {r['median_abs_err_dl']:.4f} nats, median rel err {r['median_rel_err_dl']:.1%}, "
                  f"coverage90 {r.get('coverage90', float('nan')):.1%}, forest {r['forest_median_abs_err_dl']:.4f}, "
                  f"spearman {r['spearman']:.3f}, {r['n_runs']} runs / {r['n_families']} families; "
                  f"median |err| / max(0.02, 15% dL) {r['median_err_over_target']:.2f} (target <= 1), "
                  f"{r['within_target']:.0%} of runs within it")
            for text, t in (r.get("by_eval_data") or {}).items():
                print(f"  {part} on {text}: {t['n_runs']} runs, median |err dL| {t['median_abs_err_dl']:.4f} nats, "
                      f"median rel err {t['median_rel_err_dl']:.1%}, coverage90 {t['coverage90']:.1%}, "
                      f"median |err| / target {t['median_err_over_target']:.2f}")
    return 0
