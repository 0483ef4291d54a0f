"""How long the whole zoo takes to build on this machine, from measured training throughput.

    python benchmarks/zoo_build_time.py [--steps 60] [--jobs 2]

Training all 24 models takes about an hour of an idle machine, which a benchmark should not spend.
Per-step cost does not depend on the schedule, so this trains each (family, size) for ``--steps``
steps of its real recipe (same architecture, data, batch, numerics: one thread, bf16 autocast),
``--jobs`` of them at a time in separate processes as `advisor zoo train --all --jobs 2` does, and
projects: zoo CPU time = sum over the 24 recorded recipes of steps x measured seconds per step, wall
time = that / jobs (the longest model bounds it from below). Evaluation after training (40 windows) is
measured once per size and added. Prints the table and writes benchmarks/results/zoo_build_time.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time_one(family: str, size: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)  # as a build worker: one single-threaded process per model
    from advisor.models.zoo.configs import make_recipe
    from advisor.models.zoo.manifest import evaluate_folder
    from advisor.models.zoo.train import save_model, train

    recipe = make_recipe(family, size, steps=steps, warmup_steps=1)
    result = train(recipe, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(result, Path(tmp) / "m")
        t0 = time.perf_counter()
        evaluate_folder(folder)
        eval_seconds = time.perf_counter() - t0
    return {"family": family, "size": size, "steps": steps, "train_seconds": result.seconds,
            "seconds_per_step": result.seconds / steps, "eval_seconds": eval_seconds,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zoo_build_time.json"))
    args = p.parse_args(argv)

    from advisor.models.saving import atomic_write_text
    from advisor.models.zoo.configs import FAMILY_NAMES, SIZES
    from advisor.models.zoo.manifest import manifest_models

    load_before = os.getloadavg()
    pairs = [(f, s) for s in SIZES for f in FAMILY_NAMES]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        measured = list(pool.map(_time_one, *zip(*pairs), [args.steps] * len(pairs)))
    bench_seconds = time.perf_counter() - t0
    per = {(m["family"], m["size"]): m for m in measured}
    rows, cpu = [], 0.0
    for name, entry in manifest_models().items():
        r = entry["recipe"]
        m = per[(r["family"], r["size"])]
        seconds = r["steps"] * m["seconds_per_step"] + m["eval_seconds"]
        cpu += seconds
        rows.append({"name": name, "steps": r["steps"], "projected_seconds": seconds,
                     "recorded_train_seconds": entry.get("train_seconds")})
    longest = max(r["projected_seconds"] for r in rows)
    out = {"measured": measured, "models": rows, "projected_cpu_seconds": cpu,
           "projected_wall_seconds": max(cpu / args.jobs, longest), "jobs": args.jobs,
           "benchmark_seconds": bench_seconds, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "cpu_count": os.cpu_count(), "command": "python benchmarks/zoo_build_time.py " + " ".join(argv or sys.argv[1:])}
    atomic_write_text(args.out, json.dumps(out, indent=1))
    for m in measured:
        print(f"{m['family']:6s} {m['size']:3s} {1000 * m['seconds_per_step']:7.1f} ms/step  eval {m['eval_seconds']:5.1f} s")
    print(f"zoo: {cpu / 3600:.2f} CPU-hours -> {out['projected_wall_seconds'] / 60:.0f} min with --jobs {args.jobs} "
          f"(load before {load_before[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
