"""`advisor export`: a saved native folder to compressed-tensors, GPTQ or GGUF, with the same codes."""
from __future__ import annotations

import argparse

EXPORT_FORMATS = ("compressed-tensors", "gptq", "gguf")


def add_parser(p: argparse.ArgumentParser) -> None:
    from advisor.commands._common import add_json_arg

    p.add_argument("--model", required=True,
                   help="an advisor native folder (what `quantize --out DIR` or `recommend --out R` in R/model writes)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="compressed-tensors (vLLM, transformers), gptq (GPTQ v1 checkpoint), gguf (llama.cpp, "
                        "transformers gguf_file=). See docs/export.md")
    p.add_argument("--out", required=True, help="where to write it: a folder (a .gguf file, or a folder, with --format gguf)")
    p.add_argument("--force", action="store_true",
                   help="write into an existing folder (or over a file) advisor did not create; only the files "
                        "advisor writes are replaced")
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    from advisor.cli import emit_json
    from advisor.models.errors import AdvisorError
    from advisor.models.export import check_export_request, export_model, saved_record
    from advisor.models.loading import ModelOptions, load
    from advisor.quantizers import QuantSpec

    if not args.out.strip():
        raise AdvisorError("--out needs a path, got an empty one")
    record = saved_record(args.model)  # before loading anything: the folder, its spec and the output path
    try:
        spec = QuantSpec.parse(record["spec"])
    except ValueError as e:
        raise AdvisorError(f"{args.model}: the saved spec {record['spec']!r} is not valid ({e})") from None
    check_export_request(args.format, spec, args.out, force=args.force)
    # float32 on the CPU: the stored float tensors are copied in exactly, whatever their storage dtype
    loaded = load(args.model, options=ModelOptions(device="cpu", dtype="float32"), job="load")
    if not loaded.info.get("packed"):
        raise AdvisorError(f"--model {args.model} did not load as a packed model; quantize it again with --out")
    path = export_model(loaded, None, record, args.out, args.format, force=args.force)
    out = {"spec": str(spec), "format": args.format, "saved_to": str(path), "from": str(args.model),
           "ppl": record.get("ppl"), "baseline_ppl": record.get("baseline_ppl"),
           "protocol_fingerprint": record.get("protocol_fingerprint")}
    if args.json:
        emit_json(out)
    else:
        measured = f", measured ppl {out['ppl']:.4f}" if isinstance(out["ppl"], (int, float)) else ""
        print(f"{spec}{measured}: exported ({args.format}) to {path}")
    return 0
