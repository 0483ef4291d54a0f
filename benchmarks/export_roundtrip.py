"""Exports re-measured in the target's own loader, on SmolLM2-135M, side by side in one run.

    python benchmarks/export_roundtrip.py [--model smollm2-135m] [--work DIR]
    python benchmarks/export_roundtrip.py --windows 2 --seq-len 64 --n-calib 2 --out smoke.json  # smoke run

For each (spec, format) pair: `advisor quantize --spec SPEC --format FORMAT --out DIR` (WikiText-2 test,
the first 20 windows of 512 tokens, corpus spec ``wikitext2:PATH``), then a fresh process loads the
export with plain transformers (``AutoModelForCausalLM.from_pretrained(DIR)`` for compressed-tensors,
``gguf_file=`` for GGUF), tokenizes with the exported tokenizer and measures the same windows. Pairs:
gptq:int4:g128 as compressed-tensors, gptq:int4:g32 as GGUF (Q4_0; g128 has no exact GGUF type).
SmolLM2-135M's float weights were dequantized from a 4-5 bit GGUF file, so they already sit on a 4-bit
grid: its int4 perplexities are optimistic compared with a true fp16 model.
Writes benchmarks/results/export_roundtrip.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "text" / "wikitext-2-raw-v1" / "wiki.test.raw"
PAIRS = (("gptq:int4:g128", "compressed-tensors", "ct"), ("gptq:int4:g32", "gguf", "model.gguf"))

READ_BACK = r'''
import json, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from advisor.models.data import eval_windows, load_corpus
from advisor.models.evaluate import perplexity
path, corpus = Path(sys.argv[1]), sys.argv[2]
kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
folder = path.parent if kw else path
model = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
tok = AutoTokenizer.from_pretrained(folder, **kw)
w = eval_windows(tok, load_corpus(corpus), int(sys.argv[4]), int(sys.argv[3]))
print(json.dumps({"ppl": perplexity(model, w, progress=False).ppl, "loader": type(model).__name__}))
'''


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", default=None, help="folder for the exports (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export_roundtrip.json"))
    p.add_argument("--windows", type=int, default=20, help="evaluation windows (default 20)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration windows (default 32)")
    args = p.parse_args(argv)
    corpus = f"wikitext2:{WIKI}"
    advisor = str(Path(sys.executable).with_name("advisor"))
    work = Path(args.work or tempfile.mkdtemp(prefix="export-roundtrip-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec, fmt, name in PAIRS:
        out = work / name
        q = subprocess.run([advisor, "quantize", "--model", args.model, "--spec", spec, "--format", fmt,
                            "--out", str(out), "--force", "--eval", corpus, "--max-windows", str(args.windows),
                            "--seq-len", str(args.seq_len), "--n-calib", str(args.n_calib), "--json"], capture_output=True, text=True, cwd=work)
        if q.returncode:
            print(q.stderr[-2000:], file=sys.stderr)
            return q.returncode
        measured = json.loads(q.stdout)
        r = subprocess.run([sys.executable, "-c", READ_BACK, measured["saved_to"], corpus,
                            str(args.windows), str(args.seq_len)], capture_output=True,
                           text=True, cwd=work)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            return r.returncode
        back = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"spec": spec, "format": fmt, "advisor_ppl": measured["ppl"], "baseline_ppl": measured["baseline_ppl"],
                     "transformers_ppl": back["ppl"], "rel_diff": back["ppl"] / measured["ppl"] - 1,
                     "protocol_fingerprint": measured["protocol_fingerprint"]})
        print(f"{spec:16s} {fmt:20s} advisor {measured['ppl']:.4f}  transformers {back['ppl']:.4f}  "
              f"({rows[-1]['rel_diff']:+.2e})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from advisor.kernels.io import atomic_write_text

    atomic_write_text(args.out, json.dumps({"model": args.model, "corpus": f"wikitext2 test, {args.windows} x {args.seq_len}",
                                            "n_calib": args.n_calib,
                                            "rows": rows, "tolerance": 0.005,
                                            "command": "python " + " ".join(["benchmarks/export_roundtrip.py", *(argv or sys.argv[1:])]),
                                            "cpu": _cpu(), "load_average_end": list(os.getloadavg()),
                                            "machine_shared": True}, indent=1))
    return 0 if all(abs(r["rel_diff"]) <= 0.005 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
