"""`advisor quantize`: one spec, block-sequential, packed into kernels, measured against the baseline."""
from __future__ import annotations

import argparse
import time

from advisor.commands._common import add_json_arg, add_model_args, add_protocol_args, load_model, protocol_from

FORMATS = ("native", "compressed-tensors", "gptq", "gguf")


def add_output_args(p: argparse.ArgumentParser, what: str = "the packed model") -> None:
    p.add_argument("--out", default=None,
                   help=f"where to write {what}: a folder (a .gguf file with --format gguf)")
    p.add_argument("--format", default="native", choices=FORMATS,
                   help="native (advisor's packed folder, loads back with --model DIR / advisor.load), "
                        "compressed-tensors (vLLM, transformers), gptq (GPTQ v1 checkpoint), gguf "
                        "(llama.cpp, transformers gguf_file=); default native. See docs/export.md")
    p.add_argument("--force", action="store_true",
                   help="write into an existing folder (or over a file) advisor did not create; only the files "
                        "advisor writes are replaced")


def add_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--spec", required=True, help="method:dtype[:gN][:asym][:options], e.g. gptq:int4:g128 "
                   "(`advisor ls methods`, `advisor ls dtypes`)")
    add_protocol_args(p)
    add_output_args(p)
    p.add_argument("--no-pack", action="store_true",
                   help="measure the fake-quantized model (dequantized weights) instead of packed kernels")
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    from advisor.cli import emit_json
    from advisor.models.errors import AdvisorError
    from advisor.models.evaluate import DEFAULT_TOP_K, paired_se, perplexity
    from advisor.models.pipeline import quantize_model
    from advisor.quantizers import QuantSpec
    from advisor.jsonio import protocol_fingerprint

    t0 = time.perf_counter()
    spec = QuantSpec.parse(args.spec)  # fail fast, before loading anything
    protocol = protocol_from(args)
    if args.out is not None:
        from advisor.models.export import check_export_request

        if args.no_pack:
            raise AdvisorError("--out saves the packed model; drop --no-pack to save it")
        check_export_request(args.format, spec, args.out, force=args.force)
    elif args.format != "native":
        raise AdvisorError(f"--format {args.format} needs --out (where to write it)")
    loaded = load_model(args, job="quantize")
    if loaded.info.get("packed"):
        raise AdvisorError(f"--model {args.model} is already a quantized model ({loaded.info.get('spec')}); "
                           "quantize the original float model instead")
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
        "protocol_fingerprint": protocol_fingerprint(measured.protocol, calib.protocol),  # as every document
    }
    if args.out is not None:
        from advisor.models.export import export_model

        out["saved_to"] = str(export_model(loaded, result, out, args.out, args.format, force=args.force))
        out["format"] = args.format
    if args.json:
        from advisor.jsonio import document

        emit_json(document(out, confidence=None, eval_protocol=windows.protocol, calibration=calib.protocol))
    else:
        from advisor.report import format_measurement

        print(f"{spec}: {result.bits_per_weight:.3f} bits/weight, ppl {measured.ppl:.4f} vs baseline "
              f"{baseline.ppl:.4f}; {format_measurement(out)}; {out['seconds']:.1f}s")
        if args.out is not None:
            print(f"saved ({args.format}): {out['saved_to']}")
        for note in loaded.source.notes:
            print(f"note: {note}")
    return 0
