"""`advisor recommend` against brute force, on models the predictor never saw.

    python benchmarks/recommend.py [--models zoo:llama-xs smollm2-135m] [--budgets 0.01 0.03 0.10] [--json]

For every model of the shipped fitting data (``advisor/data/runs.csv``: the project's sweep of the
zoo and SmolLM2-135M, every default candidate quantized and measured: that *is* brute force):

1. fit the predictor without the model's group (zoo: its whole family, leave-one-family-out;
   SmolLM2: the zoo only), so the recommendation is made for a family the predictor never saw;
2. for each budget (dPPL <= 1%, 3%, 10% of the baseline perplexity) run the real
   :func:`advisor.api.recommend` with a fresh measurement store (so it pays for its baseline and
   probes), on the sweep's protocol: it predicts, ranks, quantizes with the packed kernels,
   measures and escalates;
3. compare with brute force: among the candidates whose measured dL meets the budget, those of the
   cheapest cost (bytes and kernel speed, the advisor's cost order), and among them the best measured
   quality (lowest dL): quality first at equal cost, as recommend ranks.

With ``--early-stop both`` (the default) every case runs twice, side by side: with the sequential test's
early looks (a quarter, half and three quarters of the protocol's windows) and without them (every
protocol window, then further windows while the bound straddles the budget), so the compute saved is
measured in one run under one load.

Prints and records (benchmarks/results/recommend.json): ``cases``, ``agreement`` (share of cases
where the verified recommendation is the brute-force cheapest passing spec), ``cost_agreement``
(same bytes, i.e. an equally cheap spec), ``extra_bits_when_not``, ``first_attempt_pass_rate``,
``false_success`` (verified but measured above the budget: must be 0) and ``compute_ratio``
(recommend seconds over brute-force seconds: every candidate's quantize + evaluate time from the
sweep plus one baseline evaluation; model loading excluded from both), ``windows`` (evaluation windows
the attempts measured, with and without early stopping), ``inconclusive`` (cases where some attempt's
bound straddled the budget after the protocol's windows, so it measured more; and attempts left
inconclusive at the last look). Caveats: brute force was timed
by the sweep (fake-quant evaluation, often under another load), recommend here (packed-kernel
evaluation, which on CPU is slower than a dense matmul for 512-token windows, plus numba compilation
on first use); the per-case split is in ``attempt_seconds`` / ``sweep_seconds_of_attempted_specs``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this folder's kernels.py would shadow Hugging Face's `kernels` package, which transformers imports
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]


def brute_force_choice(model_runs, order: list[str], max_dl: float, cost: dict | None = None) -> dict | None:
    """Among the specs whose measured dL meets ``max_dl``, those of the cheapest cost (the first passing one
    in cost ``order`` and every spec of the same ``cost[spec]``: bytes and kernel speed), the one with the
    lowest measured dL (None: nothing passes). Without ``cost`` the first passing spec in ``order``."""
    by_spec = {r["spec"]: r for r in model_runs.to_dict("records")}
    for spec in order:
        r = by_spec.get(spec)
        if r is not None and r["dl"] <= max_dl:
            if cost is None:
                return r
            peers = [by_spec[s] for s in order if s in by_spec and cost[s] == cost[spec] and by_spec[s]["dl"] <= max_dl]
            return min(peers, key=lambda x: x["dl"])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=None, help="fitting data CSV (default: the shipped advisor/data/runs.csv)")
    p.add_argument("--models", nargs="+", default=None, help="models to test (default: every model in the runs)")
    p.add_argument("--max-models-per-group", type=int, default=None,
                   help="with the default models: at most this many per group (smallest first), to bound the time")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.01, 0.03, 0.10],
                   help="dPPL budgets as fractions of the baseline perplexity")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--confidence", type=float, default=None, help="default: advisor.api.DECISION_CONFIDENCE")
    p.add_argument("--no-explore", action="store_true", help="as recommend's --no-explore")
    p.add_argument("--measure-brute-force", default=None, metavar="STORE",
                   help="for a model with no runs in the fitting data (zoo:default), sweep every default candidate on "
                        "the same protocol into this store first: that is its brute force")
    p.add_argument("--remeasure", action="store_true",
                   help="with --measure-brute-force: measure brute force for every model, not only those without runs "
                        "(zoo models trained on this machine differ in the last bits from the shipped runs' weights)")
    p.add_argument("--early-stop", choices=["both", "on", "off"], default="both",
                   help="run recommend with the sequential test's early looks, without them, or both side by side")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recommend.json"))
    p.add_argument("--append", action="store_true",
                   help="keep the cases already in --out (a case of the same model and budget is replaced)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from advisor.api import DECISION_CONFIDENCE

    args.confidence = DECISION_CONFIDENCE if args.confidence is None else args.confidence

    import torch

    from advisor.candidates import enumerate_candidates
    from advisor.fitting import SHIPPED_RUNS, fit, read_runs
    from advisor.sweep import Protocol
    from advisor.models.loading import load
    from advisor.models.saving import atomic_write_text

    torch.manual_seed(0)
    df = read_runs(args.runs or SHIPPED_RUNS)
    proto = Protocol()
    models = args.models
    if not models:
        first = df.sort_values("non_embedding_params").drop_duplicates("model")
        if args.max_models_per_group:
            first = first.groupby("group", sort=False).head(args.max_models_per_group)
        models = first["model"].tolist()
    cases, per_model = [], {}
    for name in models:
        mruns = df[df["model"] == name]
        if args.measure_brute_force and (mruns.empty or args.remeasure):
            group = mruns["group"].iloc[0] if not mruns.empty else name
            mruns = measure_brute_force(name, proto, args.measure_brute_force, group)
        if mruns.empty:
            print(f"skipping {name}: no runs in the fitting data", file=sys.stderr)
            continue
        group = mruns["group"].iloc[0]
        train = df[(df["group"] != group) & (df["prequantized_source"].fillna(0).astype(int) == 0)]
        predictor = fit(train)
        loaded = load(name, device="cpu")
        cands = enumerate_candidates(loaded, sorted(mruns["spec"].unique()))
        order = [c.spec for c in cands]
        cost = {c.spec: (c.bytes, round(c.relative_speed, 6)) for c in cands}
        bpw = dict(zip(mruns["spec"], mruns["bits_per_weight"]))
        sweep_seconds = dict(zip(mruns["spec"], mruns["seconds"]))
        brute_run_seconds = float(mruns["seconds"].sum())
        baseline_ppl = float(mruns["baseline_ppl"].iloc[0])
        modes = {"both": [True, False], "on": [True], "off": [False]}[args.early_stop]
        for frac in args.budgets:
            max_dl = math.log1p(frac)
            bf = brute_force_choice(mruns, order, max_dl, cost)
            case = {"model": name, "group": group, "budget_frac": frac, "max_dl": max_dl, "baseline_ppl": baseline_ppl,
                    "brute_force": None if bf is None else bf["spec"],
                    "brute_force_bpw": None if bf is None else float(bf["bits_per_weight"]),
                    "brute_force_seconds": brute_run_seconds}
            for early in modes:
                r = run_case(loaded, frac, early, predictor, order, proto, args, mruns, bpw, sweep_seconds, bf, max_dl)
                case["brute_force_seconds"] = brute_run_seconds + r.pop("baseline_seconds")
                case["early_stop" if early else "full"] = r
            cases.append(case)
            parts = [f"{k}: rec={case[k]['recommended']!s:24s} att={case[k]['n_attempts']} "
                     f"win={case[k]['windows']} t={case[k]['attempt_seconds']:5.1f}s" for k in ("early_stop", "full") if k in case]
            print(f"{name:22s} {frac:5.0%} bf={case['brute_force']!s:24s} " + " | ".join(parts), file=sys.stderr, flush=True)
        per_model[name] = {"group": group, "brute_force_seconds": brute_run_seconds}
        del loaded

    if args.append and Path(args.out).exists():
        done = {(c["model"], c["budget_frac"]) for c in cases}
        cases = [c for c in json.loads(Path(args.out).read_text())["cases"]
                 if (c["model"], c["budget_frac"]) not in done] + cases
    out = {"cases": cases, "n_cases": len(cases)}
    for key in ("early_stop", "full"):
        mode = [dict(c[key], brute_force_seconds=c["brute_force_seconds"]) for c in cases if key in c]
        if mode:
            out[key] = summarize(mode)
    if "early_stop" in out and "full" in out:
        out["early_stop_over_full"] = {
            "attempt_seconds": out["early_stop"]["attempt_seconds_total"] / max(out["full"]["attempt_seconds_total"], 1e-9),
            "windows": out["early_stop"]["windows_total"] / max(out["full"]["windows_total"], 1)}
    out.update({
        "budgets": sorted({c["budget_frac"] for c in cases}),
        "confidence": args.confidence,
        "explore": not args.no_explore,
        "protocol": proto.to_dict(),
        "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_name(), "platform": platform.platform(),
                    "loadavg": os.getloadavg(), "torch": torch.__version__,
                    "note": "shared machine: other jobs ran during the measurement"},
        "command": "python benchmarks/recommend.py " + " ".join(sys.argv[1:] if argv is None else argv),
    })
    atomic_write_text(args.out, json.dumps(out, indent=1, default=str))
    summary = {k: v for k, v in out.items() if k != "cases"}
    print(json.dumps(out if args.json else summary, indent=1, default=str))
    return 0


def run_case(loaded, frac, early, predictor, order, proto, args, mruns, bpw, sweep_seconds, bf, max_dl) -> dict:
    """One recommend run (fresh store) and what it did, against brute force ``bf``."""
    from advisor.api import recommend
    from advisor.store import Store

    by_spec = {r["spec"]: r for r in mruns.to_dict("records")}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "m.sqlite")
        t0 = time.perf_counter()
        rec = recommend(loaded, max_ppl_ratio=1 + frac, confidence=args.confidence, early_stop=early,
                        explore=not args.no_explore, max_attempts=args.max_attempts, predictor=predictor, specs=order,
                        store=store, protocol=proto, progress=False)
        rec_seconds = time.perf_counter() - t0
        base_seconds = float(store._conn.execute("SELECT seconds FROM baselines").fetchone()[0])
        store.close()
    k = proto.max_windows
    chosen = next((a for a in rec.attempts if a.spec == rec.spec and a.passed), None)
    sweep_dl = None if rec.spec is None or rec.spec not in by_spec else float(by_spec[rec.spec]["dl"])
    r = {
        "recommended": rec.spec, "verified": rec.verified, "exit_code": rec.exit_code, "n_attempts": len(rec.attempts),
        "attempts": [{"spec": a.spec, "predicted_dppl": a.predicted, "measured_dl": a.measured_dl, "dl_se": a.dl_se,
                      "verdict": a.verdict, "n_windows": a.n_windows, "passed": a.passed, "seconds": a.seconds,
                      "reason": a.reason, "looks": list(a.looks)} for a in rec.attempts],
        "first_attempt_passed": bool(rec.attempts and rec.attempts[0].passed),
        "recommended_bpw": None if rec.spec is None else float(bpw.get(rec.spec, float("nan"))),
        "recommend_seconds": rec_seconds, "baseline_seconds": base_seconds,
        # false success: verified, yet above the budget by its own measurement or by the sweep's (brute force)
        "false_success": bool(rec.verified and (chosen is None or chosen.measured_dl > max_dl + 1e-12
                                                or (sweep_dl is not None and sweep_dl > max_dl + 1e-12))),
        "attempt_seconds": sum(a.seconds for a in rec.attempts),
        "windows": sum(a.n_windows or 0 for a in rec.attempts),
        "measured_more": any((a.n_windows or 0) > k for a in rec.attempts),
        "n_inconclusive": sum(a.verdict == "inconclusive" for a in rec.attempts),
        "sweep_seconds_of_attempted_specs": sum(sweep_seconds.get(a.spec, 0.0) for a in rec.attempts),
    }
    r["agree"] = r["recommended"] == (None if bf is None else bf["spec"])
    r["cost_agree"] = r["agree"] or (rec.spec is not None and bf is not None and
                                     abs(r["recommended_bpw"] - float(bf["bits_per_weight"])) < 1e-9)
    r["extra_bits"] = None if rec.spec is None or bf is None else r["recommended_bpw"] - float(bf["bits_per_weight"])
    return r


def summarize(cases: list[dict]) -> dict:
    import numpy as np

    n = len(cases)
    not_agree = [c["extra_bits"] for c in cases if not c["agree"] and c["extra_bits"] is not None]
    with_attempt = [c for c in cases if c["n_attempts"]]
    return {
        "n_cases": n,
        "agreement": sum(c["agree"] for c in cases) / n,
        "cost_agreement": sum(c["cost_agree"] for c in cases) / n,
        "extra_bits_when_not": {"mean": float(np.mean(not_agree)) if not_agree else 0.0,
                                "max": float(np.max(not_agree)) if not_agree else 0.0, "n": len(not_agree)},
        "first_attempt_pass_rate": (sum(c["first_attempt_passed"] for c in with_attempt) / len(with_attempt)
                                    if with_attempt else None),
        "verified_rate": sum(c["verified"] for c in cases) / n,
        "false_success": sum(c["false_success"] for c in cases),
        "cases_measuring_more": sum(c["measured_more"] for c in cases),
        "inconclusive_attempts": sum(c["n_inconclusive"] for c in cases),
        "attempts": sum(c["n_attempts"] for c in cases),
        "windows_total": sum(c["windows"] for c in cases),
        "compute_ratio": sum(c["recommend_seconds"] for c in cases) / sum(c["brute_force_seconds"] for c in cases),
        "recommend_seconds_total": sum(c["recommend_seconds"] for c in cases),
        "attempt_seconds_total": sum(c["attempt_seconds"] for c in cases),
        "brute_force_seconds_total": sum(c["brute_force_seconds"] for c in cases),
        # the same specs timed by recommend's attempts over the sweep that timed brute force: ~1 when
        # both ran under the same load; the compute ratio is only as fair as this is close to 1
        "attempt_over_sweep_seconds": (sum(c["attempt_seconds"] for c in cases) /
                                       max(sum(c["sweep_seconds_of_attempted_specs"] for c in cases), 1e-9)),
    }


def measure_brute_force(name: str, proto, store_path: str, group: str):
    """Every default candidate of ``name`` measured on ``proto`` (a sweep, resumable in ``store_path``), as
    fitting-data rows of ``group`` (the group left out of the predictor's fit)."""
    from advisor.candidates import default_specs
    from advisor.store import Store
    from advisor.sweep import SweepProtocol, run_sweep

    store = Store(store_path)
    run_sweep([name], default_specs(), store, SweepProtocol(**proto.to_dict()), progress=False)
    runs = store.runs()
    runs = runs[runs["model_name"] == name].copy() if "model_name" in runs else runs
    runs["model"], runs["group"] = name, group
    return runs


def cpu_name() -> str:
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), platform.processor())


if __name__ == "__main__":
    sys.exit(main())
