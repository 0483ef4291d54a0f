"""Packed dequant-matmul vs torch fp32 / bf16 nn.Linear, side by side in one run.

Usage: python benchmarks/kernels.py [--json] [--quick] [--single-thread]

For each format, shape (out, in) and batch, times the QuantLinear forward and both torch
baselines in interleaved rounds (warmup, then median of repeats), so every ratio compares
measurements taken at the same moment on this shared machine. Achieved GB/s = packed bytes of
the layer / time. Also measures the machine's copy bandwidth (torch copy of a 512 MB buffer).
Writes benchmarks/results/kernels.json; ``--json`` prints the list of rows.

``--single-thread`` runs torch and numba on one thread and times with the process CPU clock:
on a machine shared with other jobs this measures the kernels' own cost per core, which a
wall clock (quantized by the scheduler's time slices under load) cannot.
Results go to kernels_single_thread.json then.

Every run also writes ``advisor/data/kernel_speed.json``: per measured format, the median over
the shapes of the batch-1 speedup against bf16 ``nn.Linear`` (read by ``advisor/candidates.py``
as ``relative_speed``), with the command, clock and machine that produced it.
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

import torch

from advisor import kernels  # noqa: E402
from advisor.kernels.codebook import exmy_grid  # noqa: E402

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
PER_CHANNEL = 0
# name -> (bits, table, group size (0 = per output channel), asymmetric offsets, pow2 scales)
FORMATS = {
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


def build(name: str, out: int, inn: int, seed: int = 0) -> kernels.QuantLinear:
    """A random-code layer of format ``name`` (codes, scales and offsets are random)."""
    bits, table, group, asym, pow2 = FORMATS[name]
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


def run(quick: bool = False, formats=None, log=print, single_thread: bool = False) -> dict:
    repeats = 7 if quick else 25
    clock = time.perf_counter
    if single_thread:
        import numba

        numba.set_num_threads(1)  # first: launching numba's OpenMP layer resets OMP threads
        torch.set_num_threads(1)
        clock = time.process_time
    torch.manual_seed(0)
    info = {
        "command": "python benchmarks/kernels.py" + (" --quick" if quick else "")
        + (" --single-thread" if single_thread else ""),
        "clock": "process CPU time, 1 thread" if single_thread else "wall clock",
        "cpu": platform.processor() or platform.machine(), "n_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_avg_before": os.getloadavg(),
        "copy_gbps_read_plus_write": copy_bandwidth(),
        "repeats": repeats,
    }
    log(f"copy bandwidth (read+write): {info['copy_gbps_read_plus_write']:.1f} GB/s; "
        f"load average {info['load_avg_before']}")
    rows = []
    for out, inn in SHAPES:
        lin32 = torch.nn.Linear(inn, out, bias=False)
        lin16 = torch.nn.Linear(inn, out, bias=False).to(torch.bfloat16)
        for name in formats or FORMATS:
            mod = build(name, out, inn)
            nbytes = mod.packed_bytes()
            for batch in BATCHES:
                x = torch.randn(batch, inn)
                xb = x.to(torch.bfloat16)
                t = time_side_by_side({"q": lambda: mod(x), "fp32": lambda: lin32(x),
                                       "bf16": lambda: lin16(xb)}, repeats, clock=clock)
                row = {"format": name, "shape": [out, inn], "batch": batch,
                       "seconds": t["q"], "fp32_seconds": t["fp32"], "bf16_seconds": t["bf16"],
                       "speedup_vs_fp32": t["fp32"] / t["q"],
                       "speedup_vs_bf16": t["bf16"] / t["q"],
                       "gbps": nbytes / t["q"] / 1e9, "packed_bytes": nbytes,
                       # best-of-repeats: the least disturbed run on a shared machine
                       "min_seconds": t["q_min"],
                       "min_speedup_vs_fp32": t["fp32_min"] / t["q_min"],
                       "min_speedup_vs_bf16": t["bf16_min"] / t["q_min"],
                       "bits_per_weight": 8 * nbytes / (out * inn)}
                rows.append(row)
                log(f"{name:9s} {out}x{inn} b={batch}: {t['q'] * 1e3:7.3f} ms  fp32 "
                    f"{t['fp32'] * 1e3:7.3f}  bf16 {t['bf16'] * 1e3:7.3f}  "
                    f"x{row['speedup_vs_fp32']:.2f} / x{row['speedup_vs_bf16']:.2f}  "
                    f"{row['gbps']:.1f} GB/s")
            del mod
    info["load_avg_after"] = os.getloadavg()
    return {"machine": info, "rows": rows}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Command: `{m['command']}`; {m['clock']}; {m['n_cores']} cores, torch {m['torch']}, "
             f"{m['torch_threads']} threads; copy bandwidth {m['copy_gbps_read_plus_write']:.1f} "
             f"GB/s (read+write); load average before {m['load_avg_before'][0]:.2f}, after "
             f"{m['load_avg_after'][0]:.2f}.", "",
             "Medians of the repeats; the `min` columns are best-of-repeats ratios.", "",
             "| format | shape [out, in] | batch | ms | fp32 ms | bf16 ms | x fp32 | x bf16 | "
             "min x fp32 | min x bf16 | GB/s | bits/w |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['format']} | {r['shape']} | {r['batch']} | {r['seconds'] * 1e3:.3f} "
                     f"| {r['fp32_seconds'] * 1e3:.3f} | {r['bf16_seconds'] * 1e3:.3f} | "
                     f"{r['speedup_vs_fp32']:.2f} | {r['speedup_vs_bf16']:.2f} | "
                     f"{r['min_speedup_vs_fp32']:.2f} | {r['min_speedup_vs_bf16']:.2f} | "
                     f"{r['gbps']:.1f} | {r['bits_per_weight']:.3f} |")
    return "\n".join(lines)


def speed_table(result: dict) -> dict:
    """{"speedup_vs_bf16_batch1": {format: median over shapes}, "command", "machine"}."""
    per_format: dict[str, list[float]] = {}
    for r in result["rows"]:
        if r["batch"] == 1:
            per_format.setdefault(r["format"], []).append(r["speedup_vs_bf16"])
    m = result["machine"]
    return {"speedup_vs_bf16_batch1": {k: round(statistics.median(v), 3)
                                       for k, v in per_format.items()},
            "command": m["command"], "clock": m["clock"],
            "machine": {k: m[k] for k in ("cpu", "n_cores", "torch_threads", "torch",
                                          "load_avg_before", "load_avg_after",
                                          "copy_gbps_read_plus_write")}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--formats", nargs="*", default=None, help=f"subset of {list(FORMATS)}")
    ap.add_argument("--single-thread", action="store_true",
                    help="1 thread, CPU-time clock (robust on a busy shared machine)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    result = run(args.quick, args.formats, log, args.single_thread)
    argv = sys.argv[1:] if argv is None else argv
    result["machine"]["command"] = " ".join(["python benchmarks/kernels.py", *argv])
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), exist_ok=True)
    name = "kernels_single_thread.json" if args.single_thread else "kernels.json"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    speed_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "advisor", "data", "kernel_speed.json")
    with open(speed_path, "w") as f:
        json.dump(speed_table(result), f, indent=1)
        f.write("\n")
    if args.json:
        print(json.dumps(result["rows"]))
    else:
        print(markdown(result))


if __name__ == "__main__":
    main()
