"""Wall time of one small sweep with each engine, side by side in one run, and Ray's own cost per task.

    python benchmarks/sweep_engines.py [--specs ...] [--seq-len 64] [--max-windows 4]

The same sweep (``zoo:default``, ``--no-probes``, a fresh store each time) runs with
``--engine local --jobs 1``, ``--engine local --jobs 2``, and on one local Ray instance of this machine's
cores with 1 and 2 workers (tasks declaring all cores, or half of them: the threads local jobs get), a
fresh Ray instance for each. Every configuration includes its own start-up (local jobs 2 spawns two
processes that import torch; Ray's workers import torch on their first task); starting the Ray
instance is timed on its own (``ray_start_seconds``), not in the sweep's time. Ratios are against
``local --jobs 1``. Ray's overhead per task is the time of an empty task: one at a time (latency, a
round trip through the scheduler) and 200 in flight (throughput).

Writes benchmarks/results/sweep_engines.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python benchmarks/sweep_engines.py` puts benchmarks/ first on sys.path, where kernels.py would shadow
# Hugging Face's `kernels` package (which transformers imports)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
SPECS = ["rtn:int8", "rtn:int4:g128", "rtn:int4:g32", "rtn:nf4:g64", "gptq:int4:g128", "gptq:int3:g64"]


def cpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    return {"model_name": info.get("Model name", "").strip(), "cores": os.cpu_count(),
            "isa": [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4", "f16c"))]}


def _noop() -> int:
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", default=SPECS)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--n-calib", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep_engines.json"))
    args = p.parse_args(argv)

    import ray

    from advisor.models.saving import atomic_write_text
    from advisor.store import Store
    from advisor.sweep import Protocol, run_sweep

    protocol = Protocol(seq_len=args.seq_len, max_windows=args.max_windows, n_calib=args.n_calib,
                        calib_seq_len=args.seq_len)
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="sweep-engines-"))
    os.chdir(tmp)  # Ray puts the driver's folder on its workers' sys.path: keep the checkout off it
    results: dict[str, dict] = {}

    def timed(label: str, **kw) -> None:
        store = Store(tmp / f"{label.replace(' ', '_')}.sqlite")
        t = time.perf_counter()
        s = run_sweep(["zoo:default"], args.specs, store, protocol, progress=False, **kw)
        wall = time.perf_counter() - t
        assert s.done == len(args.specs) and s.failed == 0, s.errors
        ppl = sorted(tuple(r) for r in store._conn.execute("SELECT spec, ppl FROM runs"))
        results[label] = {"seconds": wall, "runs": s.done, "ppl": ppl}
        print(f"{label:<22} {wall:7.1f} s", flush=True)

    timed("local jobs 1", jobs=1)
    timed("local jobs 2", jobs=2)
    ray_start = []
    for label, cpus in (("ray 1 worker", cores), ("ray 2 workers", max(1, cores // 2))):
        t = time.perf_counter()  # a fresh instance each: no worker has imported torch or kept a model yet
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray_start.append(time.perf_counter() - t)
        try:
            timed(label, engine="ray", engine_options={"cpus_per_task": cpus})
        finally:
            ray.shutdown()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        noop = ray.remote(_noop)  # one CPU each, as the sweep's tasks: they queue on the running workers
        ray.get(noop.remote())
        t = time.perf_counter()
        for _ in range(50):
            ray.get(noop.remote())
        latency = (time.perf_counter() - t) / 50
        t = time.perf_counter()
        ray.get([noop.remote() for _ in range(200)])
        throughput = (time.perf_counter() - t) / 200
    finally:
        ray.shutdown()
    same = all(results[k]["ppl"] == results["local jobs 1"]["ppl"] or
               all(abs(a[1] - b[1]) <= 1e-5 * abs(b[1]) for a, b in zip(results[k]["ppl"], results["local jobs 1"]["ppl"]))
               for k in results)
    base = results["local jobs 1"]["seconds"]
    out = {
        "machine": cpu(),
        "sweep": {"model": "zoo:default", "specs": args.specs, "protocol": protocol.to_dict()},
        "seconds": {k: round(v["seconds"], 2) for k, v in results.items()},
        "ratio_to_local_jobs_1": {k: round(v["seconds"] / base, 3) for k, v in results.items()},
        "ray_start_seconds": [round(x, 2) for x in ray_start],
        "ray_task_overhead_ms": {"latency_one_at_a_time": round(latency * 1e3, 3),
                                 "per_task_200_in_flight": round(throughput * 1e3, 3)},
        "same_ppl_every_engine": same,
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    print(json.dumps({k: out[k] for k in ("seconds", "ratio_to_local_jobs_1", "ray_start_seconds",
                                          "ray_task_overhead_ms", "same_ppl_every_engine")}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
