"""Cold numba compile time of the packed kernels: this tree vs another revision, in one run.

Usage: python benchmarks/kernels_compile.py [--against REV] [--formats int4 int3 fp6_e3m2 ...]

A fresh clone pays numba's compile of every kernel specialization on first use (the test suite's
kernel tests are most of a cold ``make test``). For each format this times, in a child process
with an empty ``NUMBA_CACHE_DIR``, the first batch-1 and batch-3 forwards of a 40x512 layer
built by ``benchmarks/kernels.py`` of the same tree (every decode path of the layout gets
compiled), then the same in a second child that loads the
cache the first one wrote. With ``--against REV`` the same is measured on a ``git worktree`` of
REV (a revision with the ``advisor.`` import namespace, its ``kernels/`` loaded as ``advisor.kernels``),
alternating the two trees format by format so both see the same machine load; the printed
ratio is REV / this tree. Writes benchmarks/results/kernels_compile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ["int4", "int3", "nf4", "fp6_e3m2"]

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import importlib.util
import torch
import advisor
# That tree's kernels/ as advisor.kernels (the installed one is this tree's), before its benchmark imports it.
spec = importlib.util.spec_from_file_location("advisor.kernels", {root!r} + "/kernels/__init__.py",
                                              submodule_search_locations=[{root!r} + "/kernels"])
pkg = importlib.util.module_from_spec(spec)
sys.modules["advisor.kernels"] = pkg
spec.loader.exec_module(pkg)
spec = importlib.util.spec_from_file_location("bench_kernels", {root!r} + "/benchmarks/kernels.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
mod = bench.build({fmt!r}, 40, 512)
out = {{}}
for b in (1, 3):
    x = torch.randn(b, 512)
    t = time.perf_counter()
    mod(x)
    out["batch%d" % b] = time.perf_counter() - t
print(json.dumps(out))
"""


def _child(root: str, fmt: str, cache: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    code = CHILD.format(root=root, fmt=fmt)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=cache)  # not the tree: its kernels/ folder would shadow other packages' `kernels`
    if r.returncode:
        raise SystemExit(f"child failed for {fmt} in {root}:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(root: str, fmt: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="numba-cold-") as cache:
        cold = _child(root, fmt, cache)
        warm = _child(root, fmt, cache)
    return {"cold_s": round(sum(cold.values()), 2), "cold": cold,
            "cached_s": round(sum(warm.values()), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", help="git revision to compare with (measured in a worktree)")
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    args = ap.parse_args()
    trees = {"this": ROOT}
    wt = None
    if args.against:
        wt = tempfile.mkdtemp(prefix="kernels-compile-")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", wt, args.against],
                       check=True, capture_output=True)
        trees[args.against] = wt
    rows = []
    try:
        for fmt in args.formats:
            row = {"format": fmt}
            for name, root in trees.items():
                row[name] = measure(root, fmt)
            if args.against:
                row["ratio_cold"] = round(row[args.against]["cold_s"] / row["this"]["cold_s"], 2)
            rows.append(row)
            cells = "  ".join(f"{n}: cold {row[n]['cold_s']:6.1f} s, cached {row[n]['cached_s']:4.1f} s"
                              for n in trees)
            extra = f"  {args.against}/this {row['ratio_cold']:.2f}x" if args.against else ""
            print(f"{fmt:10s} {cells}{extra}", flush=True)
    finally:
        if wt:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", wt],
                           capture_output=True)
    total = {n: round(sum(r[n]["cold_s"] for r in rows), 1) for n in trees}
    print("total cold: " + ", ".join(f"{n} {v} s" for n, v in total.items()))
    out = {"command": "python " + " ".join(["benchmarks/kernels_compile.py"] + sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "processor": platform.processor()},
           "rows": rows, "total_cold_s": total}
    from advisor.models.saving import atomic_write_text

    atomic_write_text(os.path.join(ROOT, "benchmarks", "results", "kernels_compile.json"), json.dumps(out, indent=1))
    print("wrote benchmarks/results/kernels_compile.json")


if __name__ == "__main__":
    main()
