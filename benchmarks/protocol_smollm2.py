"""The BOS convention and the KL statistics on SmolLM2-135M, measured side by side in one run.

    python benchmarks/protocol_smollm2.py [--part bos|kl|both]

``bos``: the baseline perplexity on WikiText-2 (the first 20 windows of 512 tokens) and the dL, with its
paired standard error, of ``rtn:int8`` and ``rtn:int4:g128`` under ``--bos never`` and ``--bos always``
(SmolLM2's tokenizer adds no BOS, so ``auto`` is ``never`` on it). ``kl``: RTN, GPTQ and QuantEase at
int4 g128 and int3 g128 under the default convention (``auto``), calibration PTB validation 32 x 512
(the protocol of docs/quantizers.md), with dL +- se and llama.cpp's KL set, each with a standard error
over windows: the mean's and the same-top rate's from the per-window values, the median's, p99's and
max's from a bootstrap over windows (1000 resamples of the 20 windows, seed 0; a max's bootstrap error
says how much the largest value depends on which windows were drawn, no more).

SmolLM2-135M's float weights were dequantized from a 4-5 bit GGUF file: its baseline already sits on a
4-bit grid, so int4 losses on it are small for RTN and int3 ones unusually large.
Writes benchmarks/results/protocol_smollm2.json after every spec.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this folder's kernels.py would shadow Hugging Face's `kernels` package, which transformers imports
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
SHARED = ROOT.parent / "shared" / "data" / "text"


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), platform.processor())
    except OSError:
        return platform.processor()


def kl_errors(kld, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Standard errors over windows of the KL statistics (module docstring)."""
    import numpy as np

    tok = kld.token_kld.double().numpy()  # (n_windows, tokens)
    n = tok.shape[0]
    rng = np.random.default_rng(seed)
    boot = {"median": [], "p99": [], "max": []}
    for _ in range(n_boot):
        flat = tok[rng.integers(0, n, n)].reshape(-1)
        boot["median"].append(np.median(flat))
        boot["p99"].append(np.quantile(flat, 0.99))
        boot["max"].append(flat.max())
    same = np.asarray(kld.window_same_top)
    return {"mean": kld.se, "same_top_rate": float(same.std(ddof=1) / np.sqrt(n)),
            **{k: float(np.std(v, ddof=1)) for k, v in boot.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--part", choices=["bos", "kl", "both"], default="both")
    p.add_argument("--eval", default=f"wikitext2:{SHARED / 'wikitext-2-raw-v1' / 'wiki.test.raw'}")
    p.add_argument("--calib", default=f"file:{SHARED / 'ptb' / 'ptb.valid.txt'}")
    p.add_argument("--kl-specs", nargs="+", default=["rtn:int4:g128", "gptq:int4:g128", "quantease:int4:g128",
                                                     "rtn:int3:g128", "gptq:int3:g128", "quantease:int3:g128"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "protocol_smollm2.json"))
    args = p.parse_args(argv)

    import torch

    from advisor.models.evaluate import DEFAULT_TOP_K, paired_se, perplexity
    from advisor.models.loading import load
    from advisor.models.pipeline import quantize_model
    from advisor.models.saving import atomic_write_text
    from advisor.protocol import Protocol

    loaded = load(args.model)
    pristine = {n: l.weight.data.clone() for n, l in loaded.adapter.linear_layers()}
    result = {"model": args.model, "cpu": cpu(), "command": "python benchmarks/protocol_smollm2.py "
              + " ".join(argv or sys.argv[1:]), "baselines": {}, "rows": []}

    def run(bos: str, specs: list[str], part: str) -> None:
        proto = Protocol(eval=args.eval, calib=args.calib, seq_len=512, max_windows=20, n_calib=32, bos=bos)
        ev, cal = proto.windows(loaded)
        base = perplexity(loaded.model, ev, progress=False, top_k=DEFAULT_TOP_K)
        result["baselines"][bos] = {"ppl": base.ppl, "nll": base.nll, "protocol": ev.protocol,
                                    "bos_token_id": ev.protocol.get("bos_token_id")}
        print(f"[{bos}] baseline ppl {base.ppl:.4f}", flush=True)
        for spec in specs:
            t0 = time.perf_counter()
            q = quantize_model(loaded, spec, cal, pack=False, progress=False)
            r = perplexity(loaded.model, ev, progress=False, reference=base.reference)
            with torch.no_grad():
                for n, layer in loaded.adapter.linear_layers():
                    layer.weight.data.copy_(pristine[n])
            row = {"part": part, "bos": bos, "spec": spec, "bits_per_weight": q.bits_per_weight, "ppl": r.ppl,
                   "baseline_ppl": base.ppl, "dppl": r.ppl - base.ppl, "dl": r.nll - base.nll,
                   "dl_se": paired_se(r.window_nll, base.window_nll), "kld": r.kld.to_dict(),
                   "kld_se": kl_errors(r.kld), "seconds": time.perf_counter() - t0,
                   "load_average": os.getloadavg()[0]}
            result["rows"].append(row)
            print(f"[{bos}] {spec}: ppl {r.ppl:.4f} dL {row['dl']:+.5f} ± {row['dl_se']:.5f} "
                  f"KL {r.kld.mean:.5f} ± {r.kld.se:.5f} top1 {r.kld.same_top_rate:.3f} ({row['seconds']:.0f}s)", flush=True)
            atomic_write_text(args.out, json.dumps(result, indent=1, default=str))

    if args.part in ("bos", "both"):
        for bos in ("never", "always"):
            run(bos, ["rtn:int8", "rtn:int4:g128"], "bos")
    if args.part in ("kl", "both"):
        run("auto", args.kl_specs, "kl")
    atomic_write_text(args.out, json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
