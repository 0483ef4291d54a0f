"""One decoder block of mistral-7b's configuration (random weights, 218M parameters) forward on 128 tokens,
in bf16, in bf16 weights with float32 products (what advisor loads a bf16 model as on a CPU without bf16
arithmetic, ``models.upcast``) and in fp32, on this machine: the measured unit behind the README's 7B CPU
times (a 7B forward is 32 such blocks plus the head), without building the 14.5 GB checkpoint.

    python benchmarks/block_7b.py [--threads 2] [--tokens 128]

Writes benchmarks/results/block_7b.json (seconds, GFLOP/s, CPU model and load average).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "block_7b.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    import transformers as tf

    torch.set_num_threads(args.threads)
    cfg = tf.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=1000, max_position_embeddings=4096)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "")
    out = {"command": "python benchmarks/block_7b.py " + " ".join(argv or sys.argv[1:]), "cpu": cpu,
           "threads": args.threads, "tokens": args.tokens, "load_average_start": os.getloadavg()}
    from advisor.models.upcast import float32_products

    for name, dt in (("bfloat16", torch.bfloat16), ("bfloat16_float32_products", torch.bfloat16),
                     ("float32", torch.float32)):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dt).eval()
        if name == "bfloat16_float32_products":
            float32_products(model)
        n = sum(q.numel() for q in model.model.layers[0].parameters())
        ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
        with torch.no_grad():
            t0 = time.perf_counter()
            model.model(ids)
            s = time.perf_counter() - t0
        out[name] = {"block_params": n, "seconds": s, "gflops": 2 * n * args.tokens / s / 1e9,
                                              "projected_7b_forward_seconds": 32 * s}
        del model
    out["load_average_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(out, indent=2))
    for k in ("bfloat16", "bfloat16_float32_products", "float32"):
        r = out[k]
        print(f"{k:26s} one block, {args.tokens} tokens: {r['seconds']:.1f} s ({r['gflops']:.2f} GFLOP/s); "
              f"32 blocks {r['projected_7b_forward_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
