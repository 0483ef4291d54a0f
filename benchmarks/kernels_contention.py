"""Batch-1 packed kernels alone, right after a torch op, and with cold caches: on torch's OpenMP
team vs on the kernel's own helper thread.

    python benchmarks/kernels_contention.py [--calls 50]

`benchmarks/kernels.py` times every op in shuffled rounds, so each packed call follows a torch call
whose OpenMP workers are still spinning on the other core, and whose weights (32-64 MB) pushed the
packed layer's 8-24 MB out of the 32 MB L3. This script separates the two effects, side by side in
one run, for int4 g128 and fp6_e3m2 at 4096x4096 and 11008x4096, with the packed kernel's threads
taken from torch's OpenMP team (``kernels.team``, the default) and from its own helper thread (the
fallback):

- ``alone``: ``--calls`` calls in a row (first one untimed): L3-warm, no spinning torch workers;
- ``after_fp32`` / ``after_bf16``: each call timed right after a torch ``nn.Linear``;
- ``cold``: each call timed after reading a 96 MB buffer (L3 flushed; no torch op in between),
  as in a model whose weights do not fit in the cache; torch fp32 / bf16 are timed the same way.

Writes benchmarks/results/kernels_contention.json.
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


def _timed(fn, calls: int, before=None) -> float:
    """Median seconds of ``fn`` over ``calls`` calls, each preceded by ``before`` (untimed)."""
    if before is None:
        fn()  # untimed: absorbs the hand-over from whatever ran before
    times = []
    for _ in range(calls):
        if before is not None:
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
    from advisor.models.saving import atomic_write_text

    import numpy as np

    from advisor.kernels import team

    flush_buf = np.ones(96 * 2 ** 20 // 8)

    def flush():
        flush_buf.sum()

    team_available = team.available

    def use_team(on: bool):
        team.available = team_available if on else (lambda: False)

    rows = []
    load_before = os.getloadavg()
    with torch.no_grad():
        for out, inn in ((4096, 4096), (11008, 4096)):
            lin32 = torch.nn.Linear(inn, out, bias=False)
            lin16 = torch.nn.Linear(inn, out, bias=False).to(torch.bfloat16)
            x = torch.randn(1, inn)
            xb = x.to(torch.bfloat16)
            fp32 = {"alone": _timed(lambda: lin32(x), args.calls),
                    "cold": _timed(lambda: lin32(x), args.calls, flush)}
            bf16 = {"alone": _timed(lambda: lin16(xb), args.calls),
                    "cold": _timed(lambda: lin16(xb), args.calls, flush)}
            for name in ("int4", "fp6_e3m2"):
                q = build(name, out, inn)
                for _ in range(3):  # compile and warm every path
                    q(x), lin32(x), lin16(xb)
                row = {"format": name, "shape": [out, inn], "fp32_seconds": fp32, "bf16_seconds": bf16}
                try:
                    for threads in ("team", "own"):
                        use_team(threads == "team")
                        q(x)
                        t = {"alone": _timed(lambda: q(x), args.calls),
                             "after_fp32": _timed(lambda: q(x), args.calls, lambda: lin32(x)),
                             "after_bf16": _timed(lambda: q(x), args.calls, lambda: lin16(xb)),
                             "cold": _timed(lambda: q(x), args.calls, flush)}
                        row[f"q_{threads}_seconds"] = t
                        # the torch baselines in the same condition: alone for alone/after, cold for cold
                        row[f"q_{threads}_speedup_vs_fp32"] = {
                            k: fp32["cold" if k == "cold" else "alone"] / v for k, v in t.items()}
                        row[f"q_{threads}_speedup_vs_bf16"] = {
                            k: bf16["cold" if k == "cold" else "alone"] / v for k, v in t.items()}
                finally:
                    use_team(True)
                rows.append(row)
                for threads in ("team", "own"):
                    t = row[f"q_{threads}_seconds"]
                    s32, s16 = row[f"q_{threads}_speedup_vs_fp32"], row[f"q_{threads}_speedup_vs_bf16"]
                    print(f"{name:9s} {out}x{inn} {threads:4s}: " + ", ".join(
                        f"{k} {1e3 * v:.3f} ms (x{s32[k]:.2f}/x{s16[k]:.2f})" for k, v in t.items()))
                print(f"{'':9s} {out}x{inn} torch: fp32 alone {1e3 * fp32['alone']:.3f} cold "
                      f"{1e3 * fp32['cold']:.3f} ms, bf16 alone {1e3 * bf16['alone']:.3f} cold "
                      f"{1e3 * bf16['cold']:.3f} ms")
                del q
    result = {"rows": rows, "calls": args.calls, "torch_threads": torch.get_num_threads(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "command": "python benchmarks/kernels_contention.py " + " ".join(argv or sys.argv[1:])}
    atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
