"""Batch-1 packed kernels alone vs right after a torch op: the cost of torch's spinning OpenMP workers.

    python benchmarks/kernels_contention.py [--calls 50]

`benchmarks/kernels.py` times every op in shuffled rounds, so each packed call follows a torch call
whose OpenMP workers are still spinning on the other core, where our kernel's helper thread needs
to run. This script measures, side by side in one run, for int4 g128 and fp6_e3m2 at 4096x4096 and
11008x4096: the packed layer alone (``--calls`` calls in a row, first call untimed), the packed layer
right after an fp32 ``nn.Linear`` (each call timed alone), and torch fp32 / bf16 alone, with the
ratios. Writes benchmarks/results/kernels_contention.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _alone(fn, calls: int) -> float:
    fn()  # untimed: absorbs the hand-over from whatever ran before
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _after(before, fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernels_contention.json"))
    args = p.parse_args(argv)

    import torch

    from benchmarks.kernels import build
    from models.saving import atomic_write_text

    rows = []
    load_before = os.getloadavg()
    with torch.no_grad():
        for out, inn in ((4096, 4096), (11008, 4096)):
            lin32 = torch.nn.Linear(inn, out, bias=False)
            lin16 = torch.nn.Linear(inn, out, bias=False).to(torch.bfloat16)
            x = torch.randn(1, inn)
            xb = x.to(torch.bfloat16)
            for name in ("int4", "fp6_e3m2"):
                q = build(name, out, inn)
                for _ in range(3):  # compile and warm every path
                    q(x), lin32(x), lin16(xb)
                row = {"format": name, "shape": [out, inn],
                       "q_alone_seconds": _alone(lambda: q(x), args.calls),
                       "q_after_fp32_seconds": _after(lambda: lin32(x), lambda: q(x), args.calls),
                       "fp32_alone_seconds": _alone(lambda: lin32(x), args.calls),
                       "bf16_alone_seconds": _alone(lambda: lin16(xb), args.calls)}
                for k in ("alone", "after_fp32"):
                    row[f"{k}_speedup_vs_fp32"] = row["fp32_alone_seconds"] / row[f"q_{k}_seconds"]
                    row[f"{k}_speedup_vs_bf16"] = row["bf16_alone_seconds"] / row[f"q_{k}_seconds"]
                rows.append(row)
                print(f"{name:9s} {out}x{inn}: alone {1e3 * row['q_alone_seconds']:.3f} ms "
                      f"(x{row['alone_speedup_vs_fp32']:.2f} fp32 / x{row['alone_speedup_vs_bf16']:.2f} bf16), "
                      f"after fp32 {1e3 * row['q_after_fp32_seconds']:.3f} ms "
                      f"(x{row['after_fp32_speedup_vs_fp32']:.2f} / x{row['after_fp32_speedup_vs_bf16']:.2f}); "
                      f"fp32 {1e3 * row['fp32_alone_seconds']:.3f} ms, bf16 {1e3 * row['bf16_alone_seconds']:.3f} ms")
                del q
    result = {"rows": rows, "calls": args.calls, "torch_threads": torch.get_num_threads(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "command": "python benchmarks/kernels_contention.py " + " ".join(argv or sys.argv[1:])}
    atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
