"""Blind check of the shipped predictor on runs measured after its design was frozen.

    python benchmarks/predictor_blind_protocol.py [--model smollm2-135m]
        [--eval file:../shared/data/text/wikitext-2-raw-v1/wiki.test.raw] [--calib (same)]
        [--specs SPEC ...] [--store PATH] [--name wikitext2]

The shipped predictor (advisor/data/predictor.json) was fitted on the zoo's runs on the
``stdlib-code`` protocol, and its design was chosen after SmolLM2's runs on that protocol had been
seen (docs/predictor.md). This benchmark measures new runs that no design choice has seen: the
model on another text (default: WikiText-2 raw test, calibration windows drawn from the same file
and disjoint from the evaluation windows), with the probes on that text's calibration windows.

1. ``run_sweep`` of the model over the specs on the protocol (resumable; its own store, default
   ADVISOR_HOME/predictor_blind_<name>.sqlite, so the default store's probes are not mixed);
2. every run predicted by the shipped predictor, as ``advisor predict`` would (features from the
   probes of that store), and the same error report as ``advisor fit --report``.

Default specs: every RTN spec of the default grid (19) and the 3-bit GPTQ, AWQ and QuantEase specs
plus GPTQ int4 g128 (the method runs cost minutes each here).
Writes benchmarks/results/predictor_blind_<name>.json, and the fitting table of its runs (features and
measured dL: what ``advisor fit --runs`` reads) to benchmarks/results/predictor_blind_<name>_runs.csv, so a
later predictor can be checked on the same runs without measuring them again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIKITEXT = ROOT.parent / "shared" / "data" / "text" / "wikitext-2-raw-v1" / "wiki.test.raw"
METHOD_SPECS = ["gptq:int4:g128", "gptq:int3:g128", "awq:int3:g128", "quantease:int3:g128"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval", default=f"file:{WIKITEXT}")
    p.add_argument("--calib", default=None, help="calibration corpus (default: the evaluation corpus)")
    p.add_argument("--specs", nargs="+", default=None)
    p.add_argument("--name", default="wikitext2")
    p.add_argument("--store", default=None)
    p.add_argument("--method-log-r", action="store_true",
                   help="predict with format 4 plus a per-method slope on log R (benchmarks/_predictor_variants.py) "
                        "refit on the shipped runs instead of the shipped "
                        "predictor (results to predictor_blind_<name>_method_log_r.json)")
    args = p.parse_args(argv)

    from advisor.candidates import DEFAULT_SPECS
    from advisor.fitting import fit, load_default_predictor, runs_table, shipped_runs
    from advisor.predictor import error_report
    from advisor.probing import store_probes
    from advisor.store import open_store
    from advisor.sweep import Protocol, run_sweep
    from advisor.models.paths import advisor_home
    from advisor.models.saving import atomic_write_table, atomic_write_text

    specs = args.specs or [s for s in DEFAULT_SPECS if s.startswith("rtn:")] + METHOD_SPECS
    store = open_store(args.store or advisor_home() / f"predictor_blind_{args.name}.sqlite")
    protocol = Protocol(eval=args.eval, calib=args.calib or args.eval)
    t0 = time.perf_counter()
    summary = run_sweep([args.model], specs, store, protocol, on_model=store_probes)
    if summary.failed:
        print(f"{summary.failed} runs failed: {summary.errors}", file=sys.stderr)
    df = runs_table(store)
    df = df[df["spec"].isin(specs)].reset_index(drop=True)
    if args.method_log_r:
        from benchmarks._predictor_variants import variant

        predictor, predictor_name = fit(shipped_runs(), make=variant(method_guard=False, method_log_r=True)), \
            "variant method_guard=False, method_log_r=True refit on advisor/data/runs.csv (transfer runs left out)"
    else:
        predictor, predictor_name = load_default_predictor(), "advisor/data/predictor.json"
    mean, lo, up = predictor.predict_interval(df, 0.1)
    rep = error_report(df["dl"].to_numpy(), mean, lo, up, df["baseline_ppl"].to_numpy())
    is_rtn = (df["method"] == "rtn").to_numpy()
    for name, mask in (("rtn", is_rtn), ("methods", ~is_rtn)):
        if mask.any():
            part = error_report(df["dl"].to_numpy()[mask], mean[mask])
            rep[f"{name}_median_err_over_target"] = part["median_err_over_target"]
            rep[f"{name}_within_target"] = part["within_target"]
    runs = [{"spec": s, "dl": float(d), "pred_dl": float(m), "lower": float(a), "upper": float(b),
             "rtn_dl": float(r), "rtn_dl_se": float(e), "inside": bool(a <= d <= b)}
            for s, d, m, a, b, r, e in zip(df["spec"], df["dl"], mean, lo, up, df["rtn_dl"], df["rtn_dl_se"])]
    out = {"command": "python benchmarks/predictor_blind_protocol.py " + " ".join(argv or sys.argv[1:]),
           "model": args.model, "protocol": protocol.to_dict(), "predictor": predictor_name,
           "report": rep, "runs": runs, "seconds": time.perf_counter() - t0, "sweep": summary.to_dict()}
    path = ROOT / "benchmarks" / "results" / f"predictor_blind_{args.name}.json"
    atomic_write_table(path.with_name(f"predictor_blind_{args.name}_runs.csv"), df)
    if args.method_log_r:
        path = path.with_name(f"predictor_blind_{args.name}_method_log_r.json")
    atomic_write_text(path, json.dumps(out, indent=1, default=float))
    for r in runs:
        print(f"{r['spec']:28s} measured {r['dl']:8.4f}  predicted {r['pred_dl']:8.4f} "
              f"[{r['lower']:8.4f}, {r['upper']:8.4f}] {'in' if r['inside'] else 'OUT'}  rtn_dl {r['rtn_dl']:.4f}")
    print(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
