"""Layer reconstruction error of every bundled method at int3 / int4 with groups of 128.

Error is the relative layer output error ``||W X - W_hat X||_F^2 / ||W X||_F^2 = tr(E H E^T) / tr(W H W^T)``
computed from ``H = X X^T``.

Part 1, synthetic: two seeded layers shaped like SmolLM2-135M projections (576x576 and 576x1536) with
correlated inputs and outlier channels (``quantizers.synthetic``).
Part 2, real (``--model``): chosen linear layers of a real model with ``H`` from full-precision
calibration activations (``--calib`` corpus, ``--n-windows`` x ``--seq-len`` tokens); reports whether
``quantease <= gptq <= rtn`` holds per layer (``quantease`` = the registered default, started from
GPTQ; ``quantease:winit`` = the paper's start from W).

    .venv/bin/python benchmarks/quantizers_layer_error.py                       # synthetic only
    .venv/bin/python benchmarks/quantizers_layer_error.py --model smollm2-135m \\
        --calib file:../shared/data/text/ptb/ptb.valid.txt

Writes ``benchmarks/results/quantizers_layer_error.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import advisor.quantizers as q
from advisor.quantizers.synthetic import synthetic_layer

METHODS = ("rtn", "gptq", "awq", "quantease", "quantease:winit", "quantease-outlier", "nonuniform")
BITS = ("int3", "int4")


def run_methods(W, stats, methods, bits_list, group=128):
    base = q.layer_error(W, torch.zeros_like(W), stats.H)
    rows = []
    for bits in bits_list:
        for m in methods:  # "name" or "name:options", e.g. "quantease:winit"
            name, _, opts = m.partition(":")
            spec = q.QuantSpec.parse(f"{name}:{bits}:g{group}" + (f":{opts}" if opts else ""))
            t = time.perf_counter()
            qw = q.get_method(spec.method).quantize(W, spec, stats)
            dt = time.perf_counter() - t
            rows.append({"spec": str(spec), "method": m, "dtype": bits,
                         "rel_error": q.layer_error(W, qw.dequantize(), stats.H) / base,
                         "bits_per_weight": spec.bits_per_weight(W.shape[1]), "seconds": dt})
    return rows


def print_table(title, rows):
    print(f"\n{title}")
    print(f"{'spec':34s} {'rel error':>10s} {'bits/w':>7s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['spec']:34s} {r['rel_error']:10.5f} {r['bits_per_weight']:7.3f} {r['seconds']:8.2f}")


def real_layers(model_name, calib_spec, n_windows, seq_len, blocks, layer_paths, seed):
    """H and mean |x| of the chosen layers' inputs over full-precision calibration windows."""
    from advisor import models
    from advisor.models.data import calibration_windows, load_corpus

    loaded = models.load(model_name)
    corpus = load_corpus(calib_spec)
    calib = calibration_windows(loaded.tokenizer, corpus, n_windows, seq_len, seed=seed,
                                max_context=loaded.adapter.max_context)
    prefix = loaded.adapter.blocks_prefix()
    wanted = {f"{prefix}.{b}.{p}" for b in blocks for p in layer_paths}
    layers = {name: layer for name, layer in loaded.adapter.linear_layers() if name in wanted}
    acc = {name: [None, None, 0] for name in layers}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            a = acc[name]
            a[0] = x.T @ x if a[0] is None else a[0].addmm_(x.T, x)
            s = x.abs().sum(0)
            a[1] = s if a[1] is None else a[1] + s
            a[2] += x.shape[0]
        return hook

    handles = [layers[n].register_forward_pre_hook(hook_for(n)) for n in layers]
    try:
        with torch.no_grad():
            for ids in calib.ids:
                loaded.model(input_ids=ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name in sorted(layers, key=lambda n: (int(n.split(".")[len(prefix.split("."))]), n)):
        H, s, n = acc[name]
        out.append((name, layers[name].weight.data.float().clone(),
                    q.LayerStats(H=H, n_tokens=n, act_abs_mean=s / n)))
    return out, dict(calib.protocol)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="also measure real layers of this model (e.g. smollm2-135m)")
    ap.add_argument("--calib", default="file:../shared/data/text/ptb/ptb.valid.txt")
    ap.add_argument("--n-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--layers", default="self_attn.q_proj,self_attn.o_proj,mlp.up_proj,mlp.down_proj")
    ap.add_argument("--real-methods", default="rtn,gptq,awq,quantease,quantease:winit,quantease-outlier,nonuniform",
                    help="comma-separated methods, each optionally with spec options (quantease:winit)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantizers_layer_error.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    result = {"benchmark": "quantizers_layer_error",
              "command": "benchmarks/quantizers_layer_error.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "metric": "tr(E H E^T) / tr(W H W^T), H = sum x x^T", "torch_threads": args.threads,
              "synthetic": [], "real": None}
    for out, inp in ((576, 576), (576, 1536)):
        W, stats, _ = synthetic_layer(out, inp, seed=args.seed)
        rows = run_methods(W, stats, METHODS, BITS)
        print_table(f"synthetic layer {out}x{inp} (seed {args.seed}, {stats.n_tokens} tokens)", rows)
        result["synthetic"].append({"shape": [out, inp], "seed": args.seed, "rows": rows})

    if args.model:
        blocks = [int(b) for b in args.blocks.split(",")]
        paths = args.layers.split(",")
        methods = tuple(args.real_methods.split(","))
        layers, protocol = real_layers(args.model, args.calib, args.n_windows, args.seq_len, blocks, paths, args.seed)
        real = {"model": args.model, "calibration": protocol, "layers": []}
        n_ordered = {b: 0 for b in BITS}
        for name, W, stats in layers:
            rows = run_methods(W, stats, methods, BITS)
            print_table(f"{args.model} {name} {tuple(W.shape)}", rows)
            err = {(r["method"], r["dtype"]): r["rel_error"] for r in rows}
            ordered = {}
            for b in BITS:
                if all((m, b) in err for m in ("rtn", "gptq", "quantease")):
                    ordered[b] = err[("quantease", b)] <= err[("gptq", b)] <= err[("rtn", b)]
                    n_ordered[b] += ordered[b]
            real["layers"].append({"name": name, "shape": list(W.shape), "rows": rows,
                                   "quantease_le_gptq_le_rtn": ordered})
        real["ordered_layers"] = {b: f"{n_ordered[b]}/{len(layers)}" for b in BITS}
        print(f"\nquantease <= gptq <= rtn holds on: " + ", ".join(f"{b} g128 {v}" for b, v in real["ordered_layers"].items()))
        result["real"] = real

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
