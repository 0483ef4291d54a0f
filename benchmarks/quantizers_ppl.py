"""Perplexity of every bundled method on a real model, measured side by side in one run.

    python benchmarks/quantizers_ppl.py [--model smollm2-135m] [--bits 3 4] [--json]

Loads the model once, measures the baseline once, then for each spec quantizes block-sequentially
(calibration: PTB validation, 32 windows x 512 tokens; evaluation: WikiText-2 test, the first 20
windows of 512 tokens, the standard protocol), measures, and restores the float weights. The last
spec is also run through the packed kernels to show packed == fake-quant.

SmolLM2-135M's float weights were dequantized from a 4-5 bit GGUF file, so they already sit on a
4-bit grid: int4 results on it are optimistic compared with a true fp16 model.
Writes benchmarks/results/quantizers_ppl.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "text"
METHODS = ("rtn", "gptq", "awq", "quantease", "quantease-outlier")


def _write(args, loaded, cal, ev, base, rows, argv, complete: bool) -> dict:
    from advisor.models.saving import atomic_write_text

    result = {"model": args.model, "model_notes": list(loaded.source.notes), "calibration": cal.protocol,
              "protocol": ev.protocol, "baseline_ppl": base.ppl, "rows": rows, "complete": complete,
              "command": "python benchmarks/quantizers_ppl.py " + " ".join(argv or sys.argv[1:])}
    atomic_write_text(args.out, json.dumps(result, indent=1, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--calib", default=f"file:{SHARED / 'ptb' / 'ptb.valid.txt'}")
    p.add_argument("--eval", default=f"wikitext2:{SHARED / 'wikitext-2-raw-v1' / 'wiki.test.raw'}")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--no-packed-check", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantizers_ppl.json"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from advisor.models.data import calibration_windows, eval_windows, load_corpus
    from advisor.models.evaluate import perplexity
    from advisor.models.loading import load
    from advisor.models.pipeline import quantize_model, set_module

    loaded = load(args.model)
    ev = eval_windows(loaded.tokenizer, load_corpus(args.eval), args.seq_len, args.max_windows)
    cal = calibration_windows(loaded.tokenizer, load_corpus(args.calib), args.n_calib, args.seq_len, seed=0, exclude=ev)
    base = perplexity(loaded.model, ev, progress=False)
    print(f"baseline ppl {base.ppl:.4f} ({base.seconds:.0f}s)", file=sys.stderr)
    pristine = {n: l.weight.data.clone() for n, l in loaded.adapter.linear_layers()}
    originals = dict(loaded.adapter.linear_layers())
    rows = []
    specs = [f"{m}:int{b}:g{args.group}" for b in args.bits for m in args.methods]
    for i, spec in enumerate(specs):
        packed = (not args.no_packed_check) and i == len(specs) - 1
        for run_packed in ([False, True] if packed else [False]):
            t0 = time.perf_counter()
            q = quantize_model(loaded, spec, cal, pack=run_packed, progress=False)
            r = perplexity(loaded.model, ev, progress=False)
            row = {"spec": spec, "packed": run_packed, "bits_per_weight": q.bits_per_weight, "ppl": r.ppl,
                   "baseline_ppl": base.ppl, "dl": r.nll - base.nll, "quantize_seconds": q.seconds,
                   "seconds": time.perf_counter() - t0,
                   "mean_rel_layer_error": sum(x.rel_error or 0 for x in q.layers) / max(len(q.layers), 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            _write(args, loaded, cal, ev, base, rows, argv, complete=False)  # keep what is measured
            for n, layer in originals.items():  # undo packing and fake quantization
                set_module(loaded.model, n, layer)
                with torch.no_grad():
                    layer.weight.copy_(pristine[n])
    result = _write(args, loaded, cal, ev, base, rows, argv, complete=True)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(f"| spec | packed | bits/weight | ppl | dPPL vs {base.ppl:.3f} | mean rel layer error |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['spec']} | {'yes' if r['packed'] else 'no'} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | "
                  f"{r['ppl'] - base.ppl:+.3f} | {r['mean_rel_layer_error']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
