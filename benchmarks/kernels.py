"""Packed dequant-matmul vs torch fp32 / bf16 nn.Linear and torch's int4 weight-only kernel.

Usage: python benchmarks/kernels.py [--json] [--quick] [--single-thread] [--isa PATH]
       [--formats ...] [--out FILE]

For each format, shape (out, in) and batch, times the QuantLinear forward, torch fp32 and bf16
``nn.Linear``, torch's int4 weight-only kernel at group size 128 with bf16 activations
(``aten._weight_int4pack_mm_for_cpu``, the peer; the same product as int4 g128) and, at batch
>= 8, dequantize-then-bf16-GEMM, in interleaved rounds (warmup, then median of repeats), so
every ratio compares measurements taken at the same moment on a shared machine. Achieved GB/s
= packed bytes of the layer / time, printed beside the machine's copy bandwidth (torch copy of
a 512 MB buffer, read + write). Every row records the CPU model, the kernel ISA path and the
load average.

``--isa avx2`` (or ``portable``) forces that kernel path (``ADVISOR_KERNEL_ISA``): the table
lookups take that path's instructions, while LLVM still targets the host for the rest of the
kernel and torch keeps its own dispatch. ``--no-avx512`` on an AVX-512 host also compiles the
numba kernels for a CPU without AVX-512 (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``; a separate
cold compile of every format) and caps torch's own kernels at AVX2 (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``), so the kernels, the baselines and the peer all run AVX2 instructions.
Either way the result is this CPU's cores and memory, not an AVX2-only machine's.

``--single-thread`` runs torch and numba on one thread and times with the process CPU clock:
on a machine shared with other jobs this measures the kernels' own cost per core, which a
wall clock (quantized by the scheduler's time slices under load) cannot.

``--json`` prints the rows and writes nothing; otherwise the result goes to ``--out`` (default
``benchmarks/results/kernels-<isa>[-single-thread].json``). No package data is written: the
speeds ``plan`` and ``recommend`` use are measured on the user's machine
(``advisor/kernel_speed.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings


def _force_isa(isa: str, no_avx512: bool) -> None:
    """Environment for ``--isa`` / ``--no-avx512`` (before numba or torch load; module doc)."""
    os.environ["ADVISOR_KERNEL_ISA"] = isa
    if isa == "avx512" or not no_avx512:
        return
    import llvmlite.binding as llvm

    feats = llvm.get_host_cpu_features()
    if not feats.get("avx512f"):
        return
    off = ("avx512", "evex512", "amx", "avxvnni", "avxifma", "avxneconvert", "avx10")
    flags = [("-" if (k.startswith(off) or not v) else "+") + k for k, v in sorted(feats.items())]
    os.environ.setdefault("NUMBA_CPU_NAME", "znver3" if "AMD" in _cpu_model() else "haswell")
    os.environ.setdefault("NUMBA_CPU_FEATURES", ",".join(flags))
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2" if isa == "avx2" else "default")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2" if isa == "avx2" else "SSE41")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split()
                              if f.startswith(("avx", "fma", "f16c", "amx", "sse4", "bmi")))
    except OSError:
        pass
    return []


NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
PER_CHANNEL = 0
FORMAT_NAMES = ("int2", "int3", "int4", "int8", "fp8_e4m3", "fp6_e3m2", "fp4_e2m1", "nf4", "mxfp4",
                "mxint8")
SUB_BYTE = ("int2", "int3", "nf4", "fp4_e2m1", "mxfp4")


def formats() -> dict:
    """name -> (bits, table, group size (0 = per output channel), asymmetric offsets, pow2
    scales). Built on first use: importing the kernels fixes the ISA path."""
    import torch

    from advisor.kernels.codebook import exmy_grid

    return {
        "int2": (2, torch.arange(4.0), 128, True, False),
        "int3": (3, torch.arange(8.0), 128, True, False),
        "int4": (4, torch.arange(16.0), 128, True, False),
        "int8": (8, torch.arange(256.0) - 128, 128, False, False),
        "fp8_e4m3": (8, torch.tensor(exmy_grid(4, 3)).float(), PER_CHANNEL, False, False),
        "fp6_e3m2": (6, torch.tensor(exmy_grid(3, 2)).float(), PER_CHANNEL, False, False),
        "fp4_e2m1": (4, torch.tensor(exmy_grid(2, 1)).float(), 128, False, False),
        "nf4": (4, torch.tensor(NF4), 128, False, False),
        "mxfp4": (4, torch.tensor(exmy_grid(2, 1)).float(), 32, False, True),
        "mxint8": (8, (torch.arange(256.0) - 128) / 64, 32, False, True),
    }


SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in)
BATCHES = [1, 8]


def build(name: str, out: int, inn: int, seed: int = 0):
    """A random-code layer of format ``name`` (codes, scales and offsets are random)."""
    from advisor import kernels

    import torch

    bits, table, group, asym, pow2 = formats()[name]
    g = torch.Generator().manual_seed(seed)
    group = group or inn
    ng = inn // group
    codes = torch.randint(0, 2 ** bits, (out, inn), generator=g, dtype=torch.uint8)
    if pow2:
        scales = torch.exp2(torch.randint(-10, -4, (out, ng), generator=g).float())
    else:
        scales = torch.rand(out, ng, generator=g) * 0.01 + 1e-3
    offsets = -scales * 8 if asym else None
    return kernels.pack_linear(codes, scales, offsets, bits=bits, table=table, group_size=group,
                               meta={"dtype": name, "scale_pow2": pow2})


def copy_bandwidth(n_bytes: int = 512 * 2 ** 20, repeats: int = 10) -> float:
    """GB/s of a torch tensor copy, counting bytes read + bytes written."""
    import torch

    src = torch.empty(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * n_bytes / statistics.median(times) / 1e9


def time_side_by_side(fns: dict, repeats: int, warmup: int = 3,
                      clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each fn, measured in interleaved rounds.

    The order is shuffled every round (fixed seed): torch's OpenMP workers keep spinning for
    a while after an op, so whatever runs right after a torch call shares the second core with
    a spinning thread; with a fixed order the packed kernel always followed bf16 and paid for it
    (A/B of two identical kernels in fixed positions: up to ~50% on the one after bf16)."""
    import torch

    keys = list(fns)
    order = random.Random(0)
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        samples = {k: [] for k in fns}
        for _ in range(repeats):
            order.shuffle(keys)
            for k in keys:
                t = clock()
                fns[k]()
                samples[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in samples.items()} | {
        f"{k}_min": min(v) for k, v in samples.items()}


def torch_int4_peer(mod, group: int = 128):
    """torch's int4 weight-only CPU kernel for the int4 layer ``mod`` (bf16 activations):
    a function of x (B, in) float32, or None when this torch lacks it."""
    import torch

    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    codes, sz = mod.int4_tinygemm_params()
    wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    szb = sz.to(torch.bfloat16)
    return lambda xb: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, wp, group, szb)


def run(quick: bool = False, names=None, log=print, single_thread: bool = False) -> dict:
    import torch

    from advisor.kernels import simd

    repeats = 7 if quick else 25
    clock = time.perf_counter
    if single_thread:
        import numba

        numba.set_num_threads(1)  # first: launching numba's OpenMP layer resets OMP threads
        torch.set_num_threads(1)
        clock = time.process_time
    torch.manual_seed(0)
    info = {
        "command": "python benchmarks/kernels.py",
        "clock": "process CPU time, 1 thread" if single_thread else "wall clock",
        "cpu": _cpu_model(), "cpu_flags": _cpu_flags(), "n_cores": os.cpu_count(),
        "isa": simd.ISA, "isa_paths_runnable": simd.runnable_paths(),
        "numba_cpu_name": os.environ.get("NUMBA_CPU_NAME"),
        "numba_avx512_codegen": ("-avx512f" not in os.environ.get("NUMBA_CPU_FEATURES", "")
                                 and simd.host_features().get("avx512f", False)),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_avg_before": os.getloadavg(),
        "copy_gbps_read_plus_write": copy_bandwidth(),
        "repeats": repeats,
    }
    bw = info["copy_gbps_read_plus_write"]
    log(f"CPU {info['cpu']}; kernel ISA path {info['isa']} (host runs "
        f"{', '.join(info['isa_paths_runnable'])}); numba AVX-512 codegen "
        f"{'on' if info['numba_avx512_codegen'] else 'off'}; torch CPU capability "
        f"{info['torch_cpu_capability']}")
    log(f"copy bandwidth (read+write): {bw:.1f} GB/s; load average {info['load_avg_before']}")
    log("columns: ms, then x fp32 / x bf16 / x torch-int4-g128 (peer) / x dequant+bf16 GEMM "
        "(batch >= 8), GB/s and its share of the copy bandwidth")
    rows = []
    for out, inn in SHAPES:
        lin32 = torch.nn.Linear(inn, out, bias=False)
        lin16 = torch.nn.Linear(inn, out, bias=False).to(torch.bfloat16)
        peer = torch_int4_peer(build("int4", out, inn))
        for name in names or FORMAT_NAMES:
            mod = build(name, out, inn)
            nbytes = mod.packed_bytes()
            for batch in BATCHES:
                x = torch.randn(batch, inn)
                xb = x.to(torch.bfloat16)
                fns = {"q": lambda: mod(x), "fp32": lambda: lin32(x), "bf16": lambda: lin16(xb)}
                if peer is not None:
                    fns["int4pk"] = lambda: peer(xb)
                if batch >= 8:
                    fns["deq_bf16"] = lambda: xb @ mod._dequantize_bf16().T
                t = time_side_by_side(fns, repeats, clock=clock)
                load = os.getloadavg()
                row = {"format": name, "shape": [out, inn], "batch": batch, "isa": simd.ISA,
                       "forward_path": mod.forward_path(batch), "cpu": info["cpu"],
                       "load_avg": list(load),
                       "seconds": t["q"], "fp32_seconds": t["fp32"], "bf16_seconds": t["bf16"],
                       "speedup_vs_fp32": t["fp32"] / t["q"],
                       "speedup_vs_bf16": t["bf16"] / t["q"],
                       "gbps": nbytes / t["q"] / 1e9, "packed_bytes": nbytes,
                       "bandwidth_share": nbytes / t["q"] / 1e9 / bw,
                       # best-of-repeats: the least disturbed run on a shared machine
                       "min_seconds": t["q_min"],
                       "min_speedup_vs_fp32": t["fp32_min"] / t["q_min"],
                       "min_speedup_vs_bf16": t["bf16_min"] / t["q_min"],
                       "bits_per_weight": 8 * nbytes / (out * inn)}
                if peer is not None:
                    row["torch_int4_seconds"] = t["int4pk"]
                    if name == "int4":
                        row["speedup_vs_torch_int4"] = t["int4pk"] / t["q"]
                if "deq_bf16" in t:
                    row["dequant_bf16_seconds"] = t["deq_bf16"]
                    row["speedup_vs_dequant_bf16"] = t["deq_bf16"] / t["q"]
                rows.append(row)
                peer_txt = f" / x{t['int4pk'] / t['q']:.2f}" if peer is not None else ""
                deq_txt = f" / x{t['deq_bf16'] / t['q']:.2f}" if "deq_bf16" in t else ""
                log(f"{name:9s} {out}x{inn} b={batch}: {t['q'] * 1e3:7.3f} ms  fp32 "
                    f"{t['fp32'] * 1e3:7.3f}  bf16 {t['bf16'] * 1e3:7.3f}"
                    + (f"  int4pk {t['int4pk'] * 1e3:7.3f}" if peer is not None else "")
                    + f"  x{row['speedup_vs_fp32']:.2f} / x{row['speedup_vs_bf16']:.2f}"
                    + peer_txt + deq_txt
                    + f"  {row['gbps']:.1f} GB/s ({100 * row['bandwidth_share']:.0f}%)  "
                    f"load {load[0]:.2f}")
            del mod
    info["load_avg_after"] = os.getloadavg()
    return {"machine": info, "rows": rows}


def targets(result: dict) -> list[dict]:
    """The issue's batch-1 / batch-8 targets, each with the measured ratio and whether it holds."""
    out = []
    for r in result["rows"]:
        checks = []
        if r["batch"] == 1 and r["format"] == "int4":
            checks += [("x fp32 >= 3", r["speedup_vs_fp32"], 3.0)]
            if "speedup_vs_torch_int4" in r:
                checks += [("x torch int4 >= 1", r["speedup_vs_torch_int4"], 1.0)]
        if r["batch"] == 1 and r["format"] in SUB_BYTE:
            checks += [("x bf16 >= 1.5", r["speedup_vs_bf16"], 1.5)]
        if r["batch"] == 1 and r["format"] == "fp6_e3m2":
            checks += [("x fp32 >= 2", r["speedup_vs_fp32"], 2.0)]
        if r["batch"] == 8:
            checks += [("x bf16 >= 1", r["speedup_vs_bf16"], 1.0)]
            if "speedup_vs_dequant_bf16" in r:
                checks += [("x dequant+bf16 >= 1", r["speedup_vs_dequant_bf16"], 1.0)]
        for what, value, need in checks:
            out.append({"format": r["format"], "shape": r["shape"], "batch": r["batch"],
                        "target": what, "value": round(value, 3), "holds": value >= need})
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"CPU: {m['cpu']}; flags {' '.join(m['cpu_flags'])}; kernel ISA path **{m['isa']}** "
             f"(numba AVX-512 codegen {'on' if m['numba_avx512_codegen'] else 'off'}, torch CPU "
             f"capability {m['torch_cpu_capability']}).", "",
             f"Command: `{m['command']}`; {m['clock']}; {m['n_cores']} cores, torch {m['torch']}, "
             f"{m['torch_threads']} threads; copy bandwidth {m['copy_gbps_read_plus_write']:.1f} "
             f"GB/s (read+write); load average before {m['load_avg_before'][0]:.2f}, after "
             f"{m['load_avg_after'][0]:.2f}.", "",
             "Medians of the repeats; the `min` columns are best-of-repeats ratios.", "",
             "| format | shape [out, in] | batch | path | ms | fp32 ms | bf16 ms | torch int4 ms | "
             "x fp32 | x bf16 | x torch int4 | x dequant+bf16 | min x fp32 | min x bf16 | GB/s | "
             "% copy bw | bits/w | load |",
             "|" + "---|" * 18]
    for r in result["rows"]:
        peer = r.get("torch_int4_seconds")
        peer_ms = "" if peer is None else f"{peer * 1e3:.3f}"
        peer_x = "" if peer is None else f"{peer / r['seconds']:.2f}"
        lines.append(f"| {r['format']} | {r['shape']} | {r['batch']} | {r['forward_path']} | "
                     f"{r['seconds'] * 1e3:.3f} "
                     f"| {r['fp32_seconds'] * 1e3:.3f} | {r['bf16_seconds'] * 1e3:.3f} | "
                     f"{peer_ms} | "
                     f"{r['speedup_vs_fp32']:.2f} | {r['speedup_vs_bf16']:.2f} | "
                     f"{peer_x} | "
                     f"{r.get('speedup_vs_dequant_bf16', float('nan')):.2f} | "
                     f"{r['min_speedup_vs_fp32']:.2f} | {r['min_speedup_vs_bf16']:.2f} | "
                     f"{r['gbps']:.1f} | {100 * r['bandwidth_share']:.0f} | "
                     f"{r['bits_per_weight']:.3f} | {r['load_avg'][0]:.2f} |")
    lines += ["", "Targets (batch 1 unless stated):", ""]
    for t in result.get("targets", []):
        lines.append(f"- {t['format']} {t['shape']} b={t['batch']}: {t['target']}: {t['value']:.2f} "
                     f"{'holds' if t['holds'] else 'MISSES'}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list (writes nothing)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--formats", nargs="*", default=None, help=f"subset of {list(FORMAT_NAMES)}")
    ap.add_argument("--single-thread", action="store_true",
                    help="1 thread, CPU-time clock (robust on a busy shared machine)")
    ap.add_argument("--isa", choices=("avx512", "avx2", "portable"), default=None,
                    help="force a kernel ISA path (default: the host's fastest)")
    ap.add_argument("--no-avx512", action="store_true",
                    help="with --isa avx2/portable: no AVX-512 in numba's or torch's code either")
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/kernels-<isa>.json)")
    args = ap.parse_args(argv)
    if args.no_avx512 and args.isa in (None, "avx512"):
        ap.error("--no-avx512 needs --isa avx2 or --isa portable")
    if args.isa:
        _force_isa(args.isa, args.no_avx512)
    warnings.filterwarnings("ignore")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    result = run(args.quick, args.formats, log, args.single_thread)
    result["targets"] = targets(result)
    argv = sys.argv[1:] if argv is None else argv
    result["machine"]["command"] = " ".join(["python benchmarks/kernels.py", *argv])
    if args.json:
        print(json.dumps(result["rows"]))
        return
    path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"kernels-{result['machine']['isa']}{'-single-thread' if args.single_thread else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
