"""Decode-kernel speed of this tree's kernels/cpu.py against another revision's, in one process.

Usage: python benchmarks/kernels_ab.py --against REV [--formats int4 int3 nf4 fp6_e3m2] [--rounds 15]

For a refactor of kernels/cpu.py that should not change speed (e.g. how the kernel paths are split into
compiled functions): REV's ``kernels/cpu.py`` is loaded next to this one as ``advisor.kernels._cpu_rev`` (it
shares this tree's ``simd`` and ``team`` modules, so only revisions whose cpu.py works with them
compare), both run the same 4096x4096 layer (``benchmarks/kernels.py``'s ``build``) on the same
phase-ordered input at batch 1 and 8, outputs must be bitwise equal, and timings alternate in
rounds (20 calls each, median over rounds). Prints REV / this per case; writes
benchmarks/results/kernels_ab.json. Needs an idle machine.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", required=True, help="git revision whose kernels/cpu.py to compare with")
    ap.add_argument("--formats", nargs="+", default=["int4", "int3", "nf4", "fp6_e3m2"])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    src = subprocess.run(["git", "-C", ROOT, "show", f"{args.against}:kernels/cpu.py"], check=True,
                         capture_output=True, text=True).stdout
    rev_path = os.path.join(ROOT, "kernels", "_cpu_rev.py")
    with open(rev_path, "w") as f:
        f.write(src)
    try:
        _run(args)
    finally:
        os.remove(rev_path)


def _run(args) -> None:
    import numpy as np
    import torch

    from advisor.kernels import cpu as this
    from advisor.kernels.int_pack import UNIT
    rev = importlib.import_module("advisor.kernels._cpu_rev")
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "benchmarks", "kernels.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = []
    for fmt in args.formats:
        mod = bench.build(fmt, 4096, 4096)
        f = mod._fast_args()
        for B in (1, 8):
            x = torch.randn(B, 4096, generator=torch.Generator().manual_seed(B)).numpy()
            wide = B == 1 and f["wide"]
            xp, xsum = this.phase_order(x, mod.n_pad, mod.tile, this.WIDE_UNIT if wide else UNIT[mod.layout],
                                        mod.group_size, mod.n_groups)
            call = (f["wdec"] if wide else f["vdec"], 2 if wide else int(f["simd"]))
            sides = {"this": this, "rev": rev}
            outs = {}
            def gemv(m, y):  # Packed with the tile fields, Packed without them, or older positional trees
                fields = getattr(getattr(m, "Packed", None), "_fields", ())
                old = tuple(f["packed"])[:10]
                if "T" in fields:
                    m.qgemv(m.Packed(*f["packed"]), xp, xsum, y, *call)
                elif fields:
                    m.qgemv(m.Packed(*old), xp, xsum, y, mod.tile, mod.tiles_per_group, *call)
                else:
                    m.qgemv(*old, xp, xsum, y, mod.tile, mod.tiles_per_group, *call)

            for name, m in sides.items():  # first call compiles (or loads numba's cache)
                outs[name] = np.zeros((B, 4096), np.float32)
                gemv(m, outs[name])
            if not np.array_equal(outs["this"], outs["rev"]):
                raise SystemExit(f"{fmt} batch {B}: outputs differ between this tree and {args.against}")
            times = {"this": [], "rev": []}
            for r in range(args.rounds):
                for name in (("this", "rev") if r % 2 else ("rev", "this")):
                    y = np.zeros((B, 4096), np.float32)
                    t = time.perf_counter()
                    for _ in range(20):
                        gemv(sides[name], y)
                    times[name].append((time.perf_counter() - t) / 20 * 1e3)
            row = {"format": fmt, "batch": B, "this_ms": statistics.median(times["this"]),
                   "rev_ms": statistics.median(times["rev"])}
            row["rev_over_this"] = row["rev_ms"] / row["this_ms"]
            rows.append(row)
            print(f"{fmt:9s} batch {B}: this {row['this_ms']:.3f} ms  {args.against} {row['rev_ms']:.3f} ms  "
                  f"{args.against}/this {row['rev_over_this']:.3f}  (outputs bitwise equal)", flush=True)
    out = {"command": "python benchmarks/kernels_ab.py " + " ".join(sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "threads": torch.get_num_threads(),
           "rows": rows}
    from advisor.models.saving import atomic_write_text

    atomic_write_text(os.path.join(ROOT, "benchmarks", "results", "kernels_ab.json"), json.dumps(out, indent=1))
    print("wrote benchmarks/results/kernels_ab.json")


if __name__ == "__main__":
    main()
