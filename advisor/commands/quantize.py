"""`advisor quantize`: one spec, block-sequential, packed into kernels, measured against the baseline."""
from __future__ import annotations

import argparse
import time

from advisor.commands._common import (add_calib_args, add_eval_args, add_json_arg, add_model_args,
                                      calib_windows_for, eval_windows_for, load_model)


def add_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--spec", required=True, help="method:dtype[:gN][:asym][:options], e.g. gptq:int4:g128 "
                   "(`advisor ls methods`, `advisor ls dtypes`)")
    add_calib_args(p)
    add_eval_args(p)
    p.add_argument("--out", default=None, help="folder to save the packed model (safetensors + quantization.json)")
    p.add_argument("--no-pack", action="store_true",
                   help="measure the fake-quantized model (dequantized weights) instead of packed kernels")
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    from advisor.cli import emit_json
    from advisor.models.evaluate import perplexity
    from advisor.models.pipeline import quantize_model
    from advisor.quantizers import QuantSpec

    t0 = time.perf_counter()
    spec = QuantSpec.parse(args.spec)  # fail fast, before loading anything
    if args.out:
        from advisor.models.saving import check_output_dir

        check_output_dir(args.out)
    loaded = load_model(args, job="quantize")
    windows = eval_windows_for(loaded, args)
    calib = calib_windows_for(loaded, args, exclude=windows)
    baseline = perplexity(loaded.model, windows, batch_size=args.batch_size, desc="baseline")
    result = quantize_model(loaded, spec, calib, pack=not args.no_pack)
    measured = perplexity(loaded.model, windows, batch_size=args.batch_size, desc=f"{spec}")
    out = {
        "spec": str(spec), "bits_per_weight": result.bits_per_weight, "ppl": measured.ppl,
        "baseline_ppl": baseline.ppl, "ppl_delta": measured.ppl - baseline.ppl,
        "dl": measured.nll - baseline.nll, "nll": measured.nll, "baseline_nll": baseline.nll,
        "seconds": time.perf_counter() - t0, "quantize_seconds": result.seconds, "packed": result.packed,
        "model": loaded.source.to_dict(), "calibration": calib.protocol, "protocol": measured.protocol,
        "model_options": loaded.resolved_options(),
    }
    if args.out:
        from advisor.models.saving import save_quantized_model

        out["saved_to"] = str(save_quantized_model(loaded, result, out, args.out))
    if args.json:
        emit_json(out)
    else:
        print(f"{spec}: {result.bits_per_weight:.3f} bits/weight, ppl {measured.ppl:.4f} vs baseline "
              f"{baseline.ppl:.4f} (+{out['ppl_delta']:.4f}, dNLL {out['dl']:.5f}), {out['seconds']:.1f}s")
        for note in loaded.source.notes:
            print(f"note: {note}")
    return 0
