"""Benchmark of the probes: does ``second_order`` rank data types like the measured RTN loss, and what do
all probes cost relative to one baseline perplexity evaluation?

For each model (``zoo:default``, every trained zoo model, SmolLM2-135M):
1. probes: ``run_probes`` with default settings on the default calibration windows
   (``stdlib-code:calib``, 8 x 128 tokens, seed 0);
2. RTN over every data type at its default group size (``probes.default_group``): fake-quantize all
   linear layers, measure the mean-NLL increase dNLL on a fixed evaluation subset (``stdlib-code:eval``,
   disjoint from calibration), restore the weights;
3. Spearman rank correlation over data types of ``second_order.<key>`` with the measured dNLL
   (``spearman_second_order_rtn``; target >= 0.9), and for comparison of -SQNR. Small models (the zoo)
   are measured on many tokens and also symmetrically, ``(L(W+e) + L(W-e))/2 - L(W)``, which removes
   the first-order term that a finite evaluation set adds with a random sign
   (``spearman_second_order_rtn_symmetric``).

Cost (SmolLM2-135M only): wall time of all probes with defaults over the time of its baseline
perplexity evaluation on the default protocol (WikiText-2 test, seq_len 512, 20 windows), measured in
the same process right before and right after the probes (mean of the two, to average out load from
other processes on a shared machine): ``probe_over_eval_seconds`` (target <= 1).

    python benchmarks/probes.py [--json] [--models zoo:default smollm2-135m]
Writes benchmarks/results/probes.json.

Cost of a prediction (``--cost``): for SmolLM2-135M (its GGUF stores the weights at 4-5 bits, so its
float baseline already sits on a 4-bit grid), a random-weight Llama with a 256k vocabulary and ~100M
block parameters (``random:256k``; SmolLM2's tokenizer), and two zoo models, each in its own process:
the baseline evaluation on the prediction protocol (``advisor.api.prepare``'s defaults:
``stdlib-code:eval``, 20 x 512 tokens), the probes ``advisor predict --spec rtn:int4:g128`` runs
(``advisor.probing.probe_features`` for that one format, nothing cached), the baseline again, and with
``--grid`` the probes of the whole default candidate grid (what ``recommend`` runs). Reported per model:
probe seconds over the mean of the two evaluations (``predict_over_eval``, target <= 1; ``grid_over_eval``),
the estimate printed before probing next to the time measured, the rtn_loss precision reached, the
process's peak RSS and the peak added while probing, next to the fp32 size of the weights.

    python benchmarks/probes.py --cost [--grid] [--cost-models smollm2-135m random:256k zoo:default]
Writes benchmarks/results/probes_cost.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/kernels.py would shadow Hugging Face's `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

WIKITEXT = Path("/work/shared/data/text/wikitext-2-raw-v1/wiki.test.raw")
SMOLLM = "smollm2-135m"
log = logging.getLogger("benchmarks.probes")


def default_models() -> list[str]:
    names = ["zoo:default"]
    try:
        from advisor.models.zoo import zoo_names
        from advisor.models.zoo.build import is_present, model_dir

        names += [f"zoo:{n}" for n in zoo_names() if is_present(model_dir(n))]
    except ImportError:
        pass
    return names + [SMOLLM]


def rtn_dnll(loaded, eval_ids, dtypes: list[str], symmetric: bool = False, batch_size: int = 1):
    """Baseline NLL and, per data type, the NLL increase of RTN at its default group size (all linear layers).

    With ``symmetric`` also ``(L(W + e) + L(W - e)) / 2 - L(W)``: the even (curvature) part of the
    increase, free of the first-order term ``g . e`` whose sign is random on a finite evaluation set.
    Returns:
        (base NLL, {dtype: dNLL}, {dtype: symmetric dNLL} (empty unless ``symmetric``), {dtype: seconds})
    """
    import torch

    from advisor.probes import default_group
    from advisor.probes._rtn import rtn_error
    from advisor.probes._util import layer_infos, mean_nll

    layers = layer_infos(loaded)
    base = mean_nll(loaded.model, eval_ids, batch_size=batch_size)
    out, sym, secs = {}, {}, {}
    originals = {li.name: li.module.weight.detach().clone() for li in layers}

    def loss_with(errors, sign):
        with torch.no_grad():
            for li in layers:
                li.module.weight.copy_(originals[li.name]).add_(errors[li.name], alpha=sign)
        return mean_nll(loaded.model, eval_ids, batch_size=batch_size) - base

    try:
        for d in dtypes:
            t0 = time.perf_counter()
            errors = {li.name: rtn_error(originals[li.name], d, default_group(d)) for li in layers}
            out[d] = loss_with(errors, 1.0)
            if symmetric:
                sym[d] = (out[d] + loss_with(errors, -1.0)) / 2
            secs[d] = time.perf_counter() - t0
            log.info("  %-12s dNLL %.5f%s (%.1fs)", d, out[d], f" sym {sym[d]:.5f}" if symmetric else "", secs[d])
    finally:
        with torch.no_grad():
            for li in layers:
                li.module.weight.copy_(originals[li.name])
    return base, out, sym, secs


def spearman(x: list[float], y: list[float]) -> float:
    import pandas as pd

    return float(pd.Series(x).corr(pd.Series(y), method="spearman"))


def bench_model(name: str, args) -> dict:
    from advisor.models.data import calibration_windows, eval_windows, load_corpus
    from advisor.models.evaluate import perplexity
    from advisor.models.loading import load
    from advisor import probes
    from advisor.probes import feature_key, run_probes
    from advisor.probes._rtn import dtype_names

    t0 = time.perf_counter()
    loaded = load(name)
    load_seconds = time.perf_counter() - t0
    ctx = loaded.adapter.max_context or 10**9
    calib = calibration_windows(loaded.tokenizer, load_corpus(probes.DEFAULT_CALIB), probes.DEFAULT_N_CALIB,
                                probes.DEFAULT_CALIB_SEQ_LEN, seed=0, max_context=ctx)
    result: dict = {"model": loaded.source.to_dict(), "load_seconds": load_seconds,
                    "n_linear_params": sum(li.weight.numel() for _, li in loaded.adapter.linear_layers())}
    timing = name == SMOLLM and WIKITEXT.is_file() and not args.no_timing
    if timing:
        ew = eval_windows(loaded.tokenizer, load_corpus(f"wikitext2:{WIKITEXT}"), 512, 20, max_context=ctx)
        e1 = perplexity(loaded.model, ew, progress=False)
    t1 = time.perf_counter()
    record = run_probes(loaded, calib, seed=0)
    probe_seconds = time.perf_counter() - t1
    if timing:
        e2 = perplexity(loaded.model, ew, progress=False)
        eval_seconds = (e1.seconds + e2.seconds) / 2
        result.update(eval_seconds=[e1.seconds, e2.seconds], baseline_ppl=e1.ppl, probe_seconds=probe_seconds,
                      probe_over_eval_seconds=probe_seconds / eval_seconds)
    result["probe_seconds"] = probe_seconds
    result["probe_seconds_by_probe"] = {k: v["seconds"] for k, v in record.provenance["probes"].items()}
    log.info("%s: probes %.1fs %s", name, probe_seconds,
             {k: round(v, 1) for k, v in result["probe_seconds_by_probe"].items()})

    # Small models: many tokens (the dNLL of near-lossless formats is ~1e-4 and the first-order noise on
    # N tokens is ~sqrt(2 dNLL / N)) and the symmetric measurement; large ones: a few 512-token windows.
    small = result["n_linear_params"] < args.small_params
    seq = min(256 if small else 512, ctx)
    n_dl = args.dl_windows_small if small else args.dl_windows
    dl_ids = eval_windows(loaded.tokenizer, load_corpus("stdlib-code:eval"), seq, n_dl, max_context=ctx).ids
    dtypes = dtype_names()
    base, dnll, sym, rtn_secs = rtn_dnll(loaded, dl_ids, dtypes, symmetric=small, batch_size=16 if small else 1)
    keys = {d: feature_key(f"rtn:{d}" + (f":g{probes.default_group(d)}" if probes.default_group(d) else "")) for d in dtypes}
    f = record.features
    so = [f[f"second_order.{keys[d]}"] for d in dtypes]
    so1 = [f[f"second_order.{keys[d]}"] + f[f"second_order.first_order_{keys[d]}"] for d in dtypes]
    sq = [-f[f"sqnr.{keys[d]}_db"] for d in dtypes]
    meas = [dnll[d] for d in dtypes]
    result.update(
        eval_subset={"corpus": "stdlib-code:eval", "seq_len": seq, "n_windows": int(dl_ids.shape[0])},
        base_nll=base,
        spearman_second_order_rtn=spearman(so, meas),
        spearman_neg_sqnr_rtn=spearman(sq, meas),
        spearman_first_plus_second_order_rtn=spearman(so1, meas),
        spearman_second_order_rtn_symmetric=spearman(so, [sym[d] for d in dtypes]) if sym else None,
        rtn_seconds=sum(rtn_secs.values()),
        per_dtype={d: {"key": keys[d], "dnll": dnll[d], "dnll_symmetric": sym.get(d),
                       "second_order": f[f"second_order.{keys[d]}"],
                       "first_order": f[f"second_order.first_order_{keys[d]}"],
                       "sqnr_db": f[f"sqnr.{keys[d]}_db"],
                       "ratio": f[f"second_order.{keys[d]}"] / dnll[d] if dnll[d] > 0 else None} for d in dtypes},
        perturbation={k.split(".", 1)[1]: v for k, v in f.items()
                      if k.startswith("perturbation.all_") and ("knee" in k or "slope" in k or "quad" in k)},
        hessian={k.split(".", 1)[1]: f[k] for k in ("hessian.trace", "hessian.trace_rel_se", "hessian.top_eigenvalue")},
    )
    # calibration of the absolute scale on formats where the quadratic regime should hold (dNLL < 0.05)
    small = [v["second_order"] / v["dnll"] for v in result["per_dtype"].values() if v["dnll"] and 0.001 < v["dnll"] < 0.05]
    result["median_ratio_small_dnll"] = sorted(small)[len(small) // 2] if small else None
    del loaded
    return result


COST_MODELS = ["smollm2-135m", "random:256k", "zoo:default", "zoo:gpt2-s-short"]


def random_256k():
    """A random-weight Llama with a 262,144-token vocabulary (tied head) and ~100M block parameters,
    with SmolLM2's tokenizer (its ids fit the vocabulary)."""
    import torch
    import transformers as tf

    from advisor.models.adapters import get_adapter
    from advisor.models.loading import LoadedModel, ModelSource, load

    tok = load(SMOLLM).tokenizer
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    return LoadedModel(model, tok, get_adapter(model), ModelSource("random:256k", "random", "LlamaConfig", "r256k-0"))


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms from /proc)."""

    def __init__(self):
        import threading

        self.peak, self.start, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(0.02)

    def __enter__(self):
        self.start = self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def cost_model(name: str, grid: bool) -> dict:
    """One model's prediction cost (module docstring), in this process."""
    import resource

    from advisor.models.data import calibration_windows, eval_windows, load_corpus
    from advisor.models.evaluate import perplexity
    from advisor.models.loading import load
    from advisor.probing import probe_features
    from advisor.protocol import DEFAULT

    import advisor.probes  # noqa: F401  (every probe module, up front)
    import advisor.quantizers  # noqa: F401  (a process-wide import cost, ~3 s, that predict pays anyway)

    loaded = random_256k() if name == "random:256k" else load(name)
    n_params = loaded.n_params()
    ctx = loaded.adapter.max_context
    ev = eval_windows(loaded.tokenizer, load_corpus("stdlib-code:eval"), 512, 20, max_context=ctx)
    cal = calibration_windows(loaded.tokenizer, load_corpus("stdlib-code:calib"), 16, ev.ids.shape[1], seed=0,
                              exclude=ev, max_context=ctx)
    pw = DEFAULT.probe_windows(loaded, exclude=ev)
    out = {"model": name, "n_params": n_params, "block_params": loaded.n_params(non_embedding=True),
           "vocab": int(loaded.model.get_output_embeddings().weight.shape[0]), "fp32_weight_bytes": 4 * n_params,
           "eval_protocol": {"windows": int(ev.ids.shape[0]), "seq_len": int(ev.ids.shape[1])}}
    with PeakRSS() as mem_eval:
        e1 = perplexity(loaded.model, ev, progress=False)
    spt = e1.seconds / e1.n_tokens
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        _, prov = probe_features(loaded, pw, store=None, loss_windows=cal, keys=["int4_g128"], progress=True,
                                 seconds_per_token=spt)
    predict_seconds = time.perf_counter() - t0
    e2 = perplexity(loaded.model, ev, progress=False)
    eval_seconds = (e1.seconds + e2.seconds) / 2
    out.update(eval_seconds=[e1.seconds, e2.seconds], predict_probe_seconds=predict_seconds,
               predict_over_eval=predict_seconds / eval_seconds,
               predict_estimate_seconds=sum(prov["estimate"]["seconds"].values()),
               predict_probes={k: v.get("seconds") for k, v in prov["probes"].items()},
               rtn_loss_precision=prov["probes"].get("rtn_loss", {}).get("precision"),
               eval_peak_added_bytes=mem_eval.peak - mem_eval.start,
               predict_peak_added_bytes=mem.peak - mem.start, rss_before_probes_bytes=mem.start)
    log.info("%s: predict probes %.1fs (estimate %.1fs) / eval %.1fs = %.2f", name, predict_seconds,
             out["predict_estimate_seconds"], eval_seconds, out["predict_over_eval"])
    if grid:
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            _, prov = probe_features(loaded, pw, store=None, loss_windows=cal, keys=None, progress=True,
                                     seconds_per_token=spt)
        grid_seconds = time.perf_counter() - t0
        out.update(grid_probe_seconds=grid_seconds, grid_over_eval=grid_seconds / eval_seconds,
                   grid_estimate_seconds=sum(prov["estimate"]["seconds"].values()),
                   grid_probes={k: v.get("seconds") for k, v in prov["probes"].items()},
                   grid_rtn_loss_precision=prov["probes"].get("rtn_loss", {}).get("precision"),
                   grid_peak_added_bytes=mem.peak - mem.start)
        log.info("%s: grid probes %.1fs / eval %.1fs = %.2f", name, grid_seconds, eval_seconds, out["grid_over_eval"])
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def cost_main(args) -> int:
    """``--cost``: every model in its own process (own peak RSS), side by side."""
    import os
    import platform
    import subprocess

    models = args.cost_models or COST_MODELS
    procs = {}
    tmp = Path(args.cost_out).resolve().parent  # the parts are written from this folder (cwd=tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    for m in models:
        part = tmp / f".probes_cost_{m.replace(':', '_')}.json"
        cmd = [sys.executable, __file__, "--cost-one", m, "--cost-part", str(part), "--threads", str(args.threads)]
        procs[m] = (subprocess.Popen(cmd + (["--grid"] if args.grid else []), cwd=tmp), part)
        if not args.parallel:
            procs[m][0].wait()
    results, failed = {}, {}
    for m, (proc, part) in procs.items():
        if proc.wait() == 0 and part.is_file():
            results[m] = json.loads(part.read_text())
            part.unlink()
        else:
            failed[m] = f"exit {proc.returncode}"
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
        flags = [f for f in flags if f.startswith(("avx", "fma", "amx", "sse4"))]
    except (OSError, StopIteration):
        flags = []
    out = {"command": "python benchmarks/probes.py " + " ".join(sys.argv[1:]), "threads": args.threads,
           "parallel_processes": bool(args.parallel),
           "machine": {"cpu": cpu, "isa_flags": flags, "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average_at_end": os.getloadavg()},
           "targets": {"predict_over_eval": "<= 1"}, "notes": {
               "smollm2-135m": "GGUF stored at 4-5 bits: the float baseline already sits on a 4-bit grid"},
           "models": results, "failed": failed}
    Path(args.cost_out).write_text(json.dumps(out, indent=2, default=str))
    print(f"{'model':20s} {'vocab':>7s} {'params':>7s} {'eval s':>7s} {'predict s':>9s} {'ratio':>6s} "
          f"{'est s':>6s} {'grid ratio':>10s} {'peak RSS':>9s} {'+probes':>8s} {'fp32 w':>7s}")
    for m, r in results.items():
        grid = f"{r['grid_over_eval']:.2f}" if "grid_over_eval" in r else "-"
        print(f"{m:20s} {r['vocab']:7d} {r['n_params'] / 1e6:6.0f}M {sum(r['eval_seconds']) / 2:7.1f} "
              f"{r['predict_probe_seconds']:9.1f} {r['predict_over_eval']:6.2f} {r['predict_estimate_seconds']:6.1f} "
              f"{grid:>10s} {r['peak_rss_bytes'] / 2**30:8.2f}G {r['predict_peak_added_bytes'] / 2**30:7.2f}G "
              f"{r['fp32_weight_bytes'] / 2**30:6.2f}G")
    for m, e in failed.items():
        print(f"{m:20s} failed: {e}")
    return 0 if results and not failed and all(r["predict_over_eval"] <= 1 for r in results.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=None, help="models (default: zoo:default, trained zoo models, smollm2-135m)")
    p.add_argument("--dl-windows", type=int, default=8,
                   help="512-token evaluation windows for the RTN dNLL of large models (default 8)")
    p.add_argument("--dl-windows-small", type=int, default=512,
                   help="256-token evaluation windows for small models (default 512)")
    p.add_argument("--small-params", type=float, default=20e6,
                   help="models with fewer linear-layer parameters count as small (default 2e7)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine more threads make small ops wait)")
    p.add_argument("--no-timing", action="store_true", help="skip the SmolLM2 probe/eval timing")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/probes.json"))
    p.add_argument("--cost", action="store_true", help="the prediction-cost benchmark instead (module docstring)")
    p.add_argument("--grid", action="store_true", help="with --cost: also the whole default grid's probes")
    p.add_argument("--parallel", action="store_true", help="with --cost: all models' processes at once")
    p.add_argument("--cost-models", nargs="*", default=None, help=f"with --cost (default {' '.join(COST_MODELS)})")
    p.add_argument("--cost-out", default=str(ROOT / "benchmarks/results/probes_cost.json"))
    p.add_argument("--cost-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cost-part", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import os

    import torch

    torch.set_num_threads(args.threads)
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    from advisor.models.errors import AdvisorError

    if args.cost_one:
        Path(args.cost_part).write_text(json.dumps(cost_model(args.cost_one, args.grid), default=str))
        return 0
    if args.cost:
        return cost_main(args)
    models = args.models or default_models()
    per_model, skipped = {}, {}
    for name in models:
        log.info("== %s", name)
        try:
            per_model[name] = bench_model(name, args)
        except AdvisorError as e:
            log.warning("skipping %s: %s", name, e)
            skipped[name] = str(e)
        Path(args.out + ".partial").write_text(json.dumps({"models": per_model, "skipped": skipped}, default=str))
    Path(args.out + ".partial").unlink(missing_ok=True)
    ratio = next((r["probe_over_eval_seconds"] for r in per_model.values() if "probe_over_eval_seconds" in r), None)
    out = {
        "spearman_second_order_rtn": {m: r["spearman_second_order_rtn"] for m, r in per_model.items()},
        "spearman_neg_sqnr_rtn": {m: r["spearman_neg_sqnr_rtn"] for m, r in per_model.items()},
        "spearman_first_plus_second_order_rtn": {m: r["spearman_first_plus_second_order_rtn"] for m, r in per_model.items()},
        "spearman_second_order_rtn_symmetric": {m: r["spearman_second_order_rtn_symmetric"]
                                                for m, r in per_model.items() if r["spearman_second_order_rtn_symmetric"] is not None},
        "threads": args.threads,
        "probe_over_eval_seconds": ratio,
        "targets": {"spearman_second_order_rtn": ">= 0.9", "probe_over_eval_seconds": "<= 1"},
        "command": "python benchmarks/probes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "skipped": skipped,
        "models": per_model,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        for m, r in per_model.items():
            extra = f", probes/eval {r['probe_over_eval_seconds']:.2f}" if "probe_over_eval_seconds" in r else ""
            sym = r["spearman_second_order_rtn_symmetric"]
            print(f"{m:24s} spearman(second_order, RTN dNLL) {r['spearman_second_order_rtn']:.3f}"
                  + (f" (symmetric dNLL {sym:.3f})" if sym is not None else "")
                  + f"  +first order {r['spearman_first_plus_second_order_rtn']:.3f}"
                  f"  -SQNR {r['spearman_neg_sqnr_rtn']:.3f}  probes {r['probe_seconds']:.1f}s{extra}")
        for m, e in skipped.items():
            print(f"{m:28s} skipped: {e}")
    return 0 if all(math.isfinite(v) for v in out["spearman_second_order_rtn"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
