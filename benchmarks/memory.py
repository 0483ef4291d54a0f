"""Peak memory and time of `advisor probe`, `predict`, `quantize` (RTN, GPTQ) and `recommend` against model size.

    python benchmarks/memory.py                         # llama ~50M, ~200M, ~800M (random weights, bf16)
    python benchmarks/memory.py --sizes 50m 200m        # a subset
    python benchmarks/memory.py --sizes 7b --commands probe predict quantize-rtn quantize-gptq
                                                        # mistral-7b's configuration (~14.5 GB bf16): needs
                                                        # >= 19 GB of available memory; see --min-available-gb

Each model is a folder (config.json, model.safetensors, a byte-level tokenizer) of random bf16 weights,
written tensor by tensor (never materialised in memory, so the 7B folder can be built on a machine that
could not hold it twice). Each command runs in its own process (the CLI, in-process in a small wrapper)
under ``nice``; its peak resident memory (``ru_maxrss``) and, where a GPU exists, peak CUDA memory are
recorded, as bytes per parameter of the model. A least-squares fit of peak against parameter count
(peak = a + b * params) per command follows, and a GPU time projection from the measured FLOPs of the
model's forward and backward passes (a projection on paper, labelled so: no GPU was used). The CPU time
of mistral-7b's configuration is projected the same way from the largest size measured and from this
CPU's measured float32 / bfloat16 matmul rates (a 7B model fits 24 GB only in bf16; labelled so).
``--report-only`` recomputes the fits and projections of an existing result file.

A watchdog stops a command when the machine's available memory falls under ``--stop-below-gb``.
Results: benchmarks/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory.json"

# llama configurations: (hidden, intermediate, layers, heads, kv_heads, vocab)
SIZES = {
    "50m": (512, 1536, 8, 8, 8, 32000),
    "200m": (1024, 2816, 12, 16, 16, 32000),
    "800m": (1536, 4096, 24, 16, 16, 32000),
    "7b": (4096, 14336, 32, 32, 8, 32000),  # mistral-7b
}
PROTOCOL = ["--calib", "stdlib-code", "--seq-len", "64", "--n-calib", "2"]
COMMANDS = {
    "probe": ["probe", "--calib", "stdlib-code", "--n-calib", "2", "--calib-seq-len", "64", "--no-cache"],
    "predict": ["predict", *PROTOCOL, "--eval", "stdlib-code", "--max-windows", "2", "--spec", "rtn:int4:g128"],
    "quantize-rtn": ["quantize", "--spec", "rtn:int4:g128", *PROTOCOL, "--eval", "stdlib-code", "--max-windows", "2"],
    "quantize-gptq": ["quantize", "--spec", "gptq:int4:g128", *PROTOCOL, "--eval", "stdlib-code",
                      "--max-windows", "2"],
    "recommend": ["recommend", "--max-ppl-ratio", "1000", *PROTOCOL, "--eval", "stdlib-code", "--max-windows", "2",
                  "--max-attempts", "1", "--no-explore", "--methods", "rtn"],
}

WRAPPER = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from advisor.cli import main
code = main(sys.argv[2:])
out = {"rc": code, "seconds": time.perf_counter() - t0,
       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
try:
    import torch
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
except Exception:
    pass
open(sys.argv[1], "w").write(json.dumps(out))
"""


def llama_config(size: str) -> dict:
    h, i, n, heads, kv, vocab = SIZES[size]
    return {"architectures": ["MistralForCausalLM" if size == "7b" else "LlamaForCausalLM"],
            "model_type": "mistral" if size == "7b" else "llama", "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": n, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for b in range(n):
        p = f"model.layers.{b}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (cfg["vocab_size"], h))]
    return out


def n_params(cfg: dict) -> int:
    import math

    return sum(math.prod(s) for _, s in tensor_shapes(cfg))


def write_random_safetensors(path: Path, cfg: dict, seed: int = 0) -> None:
    """A bf16 safetensors file of random weights, tensor by tensor: at most one tensor in memory."""
    import math

    import torch

    shapes = tensor_shapes(cfg)
    header, offset = {}, 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                std = 0.02 if "embed" in name or "lm_head" in name else 1 / math.sqrt(shape[-1])
                t = (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)
            f.write(t.view(torch.int16).numpy().tobytes())
            del t


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
                                  special_tokens=["<unk>", "<s>", "</s>"])
    text = Path(sys.modules["os"].__file__).read_text() * 2  # any Python text: the corpora are Python code
    tok.train_from_iterator([text], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def build_folder(size: str, root: Path) -> Path:
    folder = root / f"llama-{size}"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(size)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(folder)
    write_random_safetensors(folder / "model.safetensors", cfg)
    done.write_text("ok")
    return folder


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_command(folder: Path, name: str, stop_below_gb: float, timeout: float, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        wrapper = Path(tmp) / "wrapper.py"
        wrapper.write_text(WRAPPER)
        argv = ["nice", "-n", "10", sys.executable, str(wrapper), str(out), *COMMANDS[name], "--model", str(folder),
                "--json"]
        if name == "predict" or name == "recommend":
            argv += ["--store", str(Path(tmp) / "store.sqlite")]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stopped = {}

        def watch():
            while proc.poll() is None:
                if available_gb() < stop_below_gb:
                    stopped["why"] = f"stopped: available memory fell under {stop_below_gb} GB"
                    proc.kill()
                time.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            stopped["why"] = f"stopped after {timeout:.0f} s"
        result = json.loads(out.read_text()) if out.exists() else {"rc": proc.returncode}
        result["wall_seconds"] = time.perf_counter() - t0
        if stopped:
            result["stopped"] = stopped["why"]
        if result.get("rc"):
            result["stderr_tail"] = (err or "")[-400:]
        return result


def fit(points: list[tuple[int, int]]) -> dict | None:
    """peak = a + b * params, least squares (b: marginal bytes per parameter)."""
    if len(points) < 2:
        return None
    import numpy as np

    x = np.array([p for p, _ in points], dtype=float)
    y = np.array([m for _, m in points], dtype=float)
    b, a = np.polyfit(x, y, 1)
    return {"intercept_bytes": float(a), "bytes_per_param": float(b), "n_points": len(points)}


def flops_projection(cfg: dict, commands, protocol: str = "benchmark") -> dict:
    """GPU seconds of each command from its FLOP count (2 N per token forward, 6 N forward+backward) at an
    assumed sustained bf16 rate: a PROJECTION on paper, not a measurement, and a lower bound (it leaves
    out loading the weights, kernel launch and memory-bound steps such as GPTQ's column loop).

    ``protocol``: ``benchmark`` (this script's 2 x 64-token windows) or ``default`` (the CLI defaults:
    16 calibration and 20 evaluation windows of 512 tokens, probes on 8 x 128 tokens)."""
    n = n_params(cfg)
    if protocol == "default":
        calib, ev, probe = 16 * 512, 20 * 512, 8 * 128
    else:
        calib, ev, probe = 2 * 64, 2 * 64, 2 * 64
    probe_passes = 40  # forward+backward equivalents of the probes (Hessian HVPs, Fisher, perturbation, ...)
    d = max(cfg["hidden_size"], cfg["intermediate_size"])
    gptq_solver = cfg["num_hidden_layers"] * 7 * (4 / 3) * d ** 3 / 7  # Cholesky-sized work per linear layer
    flops = {"probe": 6 * n * probe * probe_passes,
             "predict": 6 * n * probe * probe_passes + 2 * n * ev + 2 * n * calib,
             "quantize-rtn": 2 * (2 * n * ev),
             "quantize-gptq": 2 * (2 * n * ev) + 2.5 * 2 * n * calib + gptq_solver,
             "recommend": 6 * n * probe * probe_passes + 3 * 2 * n * ev + 2.5 * 2 * n * calib + gptq_solver}
    rates = {"A100 bf16 at 40% of 312 TFLOP/s": 0.4 * 312e12, "H100 bf16 at 40% of 989 TFLOP/s": 0.4 * 989e12}
    out = {"label": "PROJECTION from FLOP counts (lower bound), not measured on a GPU", "protocol": protocol,
           "params": n, "assumptions": f"probes = {probe_passes} forward+backward passes over {probe} tokens; "
           "quantize = baseline + quantized evaluation (+ 2.5 block passes of calibration and the solver for GPTQ)"}
    for rate_name, rate in rates.items():
        out[rate_name] = {cmd: {"flops": flops[cmd], "seconds": flops[cmd] / rate} for cmd in commands if cmd in flops}
    return out


def matmul_rates(threads: int = 2) -> dict:
    """Measured GFLOP/s of one (256 x 4096) @ (4096 x 4096) linear in float32 and in bfloat16 on this CPU:
    the ratio says how much slower a model runs when it must compute in bf16 (a 7B model on 24 GB)."""
    import torch

    torch.set_num_threads(threads)
    out = {"threads": threads, "shape": [256, 4096, 4096]}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(256, 4096).to(dt), torch.randn(4096, 4096).to(dt)
        torch.nn.functional.linear(a, b)
        t0, n = time.perf_counter(), 3
        for _ in range(n):
            torch.nn.functional.linear(a, b)
        out[f"{name}_gflops"] = 2 * 256 * 4096 * 4096 * n / (time.perf_counter() - t0) / 1e9
    out["load_average"] = os.getloadavg()
    return out


def cpu_projection_7b(runs: dict, rates: dict | None) -> dict:
    """CPU seconds of each command on mistral-7b's configuration, PROJECTED (not measured) from the largest
    size that completed it: seconds x (7B params / its params) (every pass is linear in the parameters at a
    fixed protocol) x (float32 / bfloat16 matmul rate) when the smaller model ran in float32 and the 7B one
    must run in bf16 to fit. A lower bound for GPTQ, whose solver grows with the layer width cubed."""
    n7 = n_params(llama_config("7b"))
    slow = (rates["float32_gflops"] / rates["bfloat16_gflops"]) if rates else 1.0
    out = {"label": "PROJECTION from measured smaller models (CPU), not a 7B measurement",
           "bf16_slowdown": slow, "params": n7}
    for cmd in COMMANDS:
        done = [(r["params"], r[cmd]["seconds"], s) for s, r in runs.items()
                if s != "7b" and isinstance(r.get(cmd), dict) and r[cmd].get("rc") == 0 and "seconds" in r[cmd]]
        if done:
            p, sec, size = max(done)
            out[cmd] = {"from_size": size, "seconds_measured": sec, "seconds_fp32_compute": sec * n7 / p,
                        "seconds_bf16_compute": sec * n7 / p * slow}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["50m", "200m", "800m"], choices=list(SIZES))
    p.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    p.add_argument("--work", default=None, help="folder for the model folders (default: a temp folder, kept)")
    p.add_argument("--min-available-gb", type=float, default=None,
                   help="skip a size unless this much memory is available (default: 1.3 x its bf16 weights)")
    p.add_argument("--stop-below-gb", type=float, default=2.0, help="kill a command under this available memory")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    p.add_argument("--probes", default=None,
                   help="probes for the probe command (default all; e.g. fisher, the issue's first measurement)")
    p.add_argument("--dtype", default=None,
                   help="passed to every command (e.g. bfloat16: bf16 weights, float32 products on a CPU without bf16)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report-only", action="store_true",
                   help="recompute the fits and projections of --out without running anything")
    args = p.parse_args(argv)
    if args.dtype:
        for name in COMMANDS:
            COMMANDS[name] = COMMANDS[name] + ["--dtype", args.dtype]
    if args.probes:
        COMMANDS["probe"] = COMMANDS["probe"] + ["--probes", args.probes]
        report_probes = args.probes
    else:
        report_probes = "all"

    work = Path(args.work or Path(tempfile.gettempdir()) / "advisor-memory-bench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("flags"))
    except (OSError, StopIteration):
        cpu, flags = platform.processor(), []
    report = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    report.update({"cpu": cpu, "isa": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))),
                   "cores": os.cpu_count(), "python": platform.python_version(), "probe_set": report_probes,
                   "commands": {k: " ".join(v) for k, v in COMMANDS.items()}})
    runs = report.setdefault("runs", {})
    for size in ([] if args.report_only else args.sizes):
        cfg = llama_config(size)
        n = n_params(cfg)
        weights = 2 * n
        need = args.min_available_gb if args.min_available_gb is not None else 1.3 * weights / 2**30
        if available_gb() < need:
            print(f"{size}: skipped, {available_gb():.1f} GB available < {need:.1f} GB", flush=True)
            runs.setdefault(size, {})["skipped"] = f"{available_gb():.1f} GB available < {need:.1f} GB"
            continue
        t0 = time.perf_counter()
        folder = build_folder(size, work)
        row = runs.setdefault(size, {})
        row.update(params=n, weights_bytes=weights, build_seconds=time.perf_counter() - t0, config=cfg)
        for cmd in args.commands:
            r = run_command(folder, cmd, args.stop_below_gb, args.timeout, env)
            if "peak_rss_bytes" in r:
                r["rss_bytes_per_param"] = r["peak_rss_bytes"] / n
                r["rss_over_weights"] = r["peak_rss_bytes"] / weights
            row[cmd] = r
            print(f"{size:>5} {cmd:<14} rc {r.get('rc')} {r.get('seconds', r['wall_seconds']):8.1f}s peak "
                  f"{r.get('peak_rss_bytes', 0) / 2**30:6.2f} GiB = {r.get('rss_bytes_per_param', float('nan')):5.2f}"
                  f" B/param ({r.get('rss_over_weights', float('nan')):.2f}x bf16 weights) {r.get('stopped', '')}",
                  flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    fits = {}
    for cmd in COMMANDS:
        pts = [(r["params"], r[cmd]["peak_rss_bytes"]) for s, r in runs.items()
               if s != "7b" and cmd in r and r[cmd].get("rc") == 0 and "peak_rss_bytes" in r[cmd]]
        fits[cmd] = fit(pts)
    report["fit_peak_vs_params"] = fits
    report["gpu_projection_7b"] = {p: flops_projection(llama_config("7b"), list(COMMANDS), p)
                                   for p in ("benchmark", "default")}
    try:
        report["matmul_rates"] = matmul_rates()
    except Exception as e:  # a CPU without bf16 matmul support at all
        report["matmul_rates"] = {"error": str(e)}
    report["cpu_projection_7b"] = cpu_projection_7b(runs, report["matmul_rates"]
                                                    if "bfloat16_gflops" in report["matmul_rates"] else None)
    report["projected_7b_peak_from_fit"] = {
        cmd: (f["intercept_bytes"] + f["bytes_per_param"] * n_params(llama_config("7b"))) if f else None
        for cmd, f in fits.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for cmd, f in fits.items():
        if f:
            print(f"fit {cmd:<14} peak = {f['intercept_bytes'] / 2**30:.2f} GiB + {f['bytes_per_param']:.2f} B x params"
                  f"  -> 7B projected {report['projected_7b_peak_from_fit'][cmd] / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
