"""`advisor quantize`: one spec, block-sequential, packed into kernels, measured against the baseline."""
from __future__ import annotations

import argparse
import time

from advisor.commands._common import add_json_arg, add_model_args, add_protocol_args, load_model, protocol_from


def add_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--spec", required=True, help="method:dtype[:gN][:asym][:options], e.g. gptq:int4:g128 "
                   "(`advisor ls methods`, `advisor ls dtypes`)")
    add_protocol_args(p)
    p.add_argument("--out", default=None, help="folder to save the packed model (safetensors + quantization.json)")
    p.add_argument("--no-pack", action="store_true",
                   help="measure the fake-quantized model (dequantized weights) instead of packed kernels")
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    from advisor.cli import emit_json
    from advisor.models.evaluate import DEFAULT_TOP_K, paired_se, perplexity
    from advisor.models.pipeline import quantize_model
    from advisor.quantizers import QuantSpec

    t0 = time.perf_counter()
    spec = QuantSpec.parse(args.spec)  # fail fast, before loading anything
    protocol = protocol_from(args)
    if args.out:
        from advisor.models.saving import check_output_dir

        check_output_dir(args.out)
    loaded = load_model(args, job="quantize")
    windows, calib = protocol.windows(loaded)
    baseline = perplexity(loaded.model, windows, batch_size=protocol.batch_size, desc="baseline", top_k=DEFAULT_TOP_K)
    result = quantize_model(loaded, spec, calib, pack=not args.no_pack)
    measured = perplexity(loaded.model, windows, batch_size=protocol.batch_size, desc=f"{spec}",
                          reference=baseline.reference)
    dl = measured.nll - baseline.nll
    out = {
        "spec": str(spec), "bits_per_weight": result.bits_per_weight, "ppl": measured.ppl,
        "baseline_ppl": baseline.ppl, "ppl_delta": measured.ppl - baseline.ppl,
        "dl": dl, "dl_se": paired_se(measured.window_nll, baseline.window_nll),
        "nll": measured.nll, "baseline_nll": baseline.nll, "n_windows": len(windows),
        "kld": measured.kld.to_dict(),
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
        from advisor.report import format_measurement

        print(f"{spec}: {result.bits_per_weight:.3f} bits/weight, ppl {measured.ppl:.4f} vs baseline "
              f"{baseline.ppl:.4f}; {format_measurement(out)}; {out['seconds']:.1f}s")
        for note in loaded.source.notes:
            print(f"note: {note}")
    return 0
