"""Decode speed of the packed kernels on this machine, measured where it is used.

``plan`` and ``recommend`` rank candidates of equal size by how fast their format decodes
(``Candidate.relative_speed``: batch-1 speed relative to a bf16 ``nn.Linear``). That speed
depends on the CPU and on the kernel code path it takes (:data:`advisor.kernels.simd.ISA`),
so it is measured here, by :func:`calibrate`, and cached in ``ADVISOR_HOME/kernel_speed/``
under a key of CPU model, ISA path, package and torch versions and thread count: a different
machine, path or release measures again, the same one reuses the file.

:func:`speeds` returns the cached table, running the calibration first when
``ADVISOR_KERNEL_CALIBRATION`` is not ``0`` (the default; tests set it to ``0``). Without a
measurement, candidates carry the memory-bound estimate ``16 / bits per weight`` and say so
(``speed_source: "estimate"``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CACHE_VERSION = 1
CALIBRATION_ENV = "ADVISOR_KERNEL_CALIBRATION"
# One format per decode rule the kernels distinguish (affine per code width, ExMy per width,
# table lookup, MX power-of-two scales). Other dtypes take the median of measured formats with
# the same code width (advisor.candidates.candidate).
CALIBRATION_SPECS = ("rtn:int2:g64", "rtn:int3:g128", "rtn:int4:g128", "rtn:nf4:g64",
                     "rtn:fp4_e2m1:g128", "rtn:mxfp4", "rtn:fp6_e3m2", "rtn:int8",
                     "rtn:fp8_e4m3", "rtn:mxint8")
SHAPE = (4096, 4096)  # (out, in): larger than the last-level cache of most CPUs, as in a model
REPEATS = 9


@dataclass(frozen=True)
class SpeedTable:
    """``speeds``: dtype -> batch-1 speed relative to bf16 ``nn.Linear``; ``measured``: False when
    no calibration exists (then ``speeds`` is empty and callers estimate); ``key``: what the
    measurement is valid for."""
    speeds: dict[str, float]
    measured: bool
    key: dict = field(default_factory=dict)
    path: str | None = None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("advisor")
    except Exception:  # not installed as a distribution (a bare checkout)
        return "unknown"


@functools.lru_cache(maxsize=1)
def _kernels_digest() -> str:
    """Digest of the kernels' sources (read once per process): an edited kernel (a checkout between
    releases) is re-timed."""
    from advisor import kernels

    h = hashlib.sha256()
    for f in sorted(Path(kernels.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def cache_key() -> dict:
    """What a calibration is valid for: machine, kernel path and sources, software, threads."""
    import torch

    from advisor.kernels import simd

    return {"cache_version": CACHE_VERSION, "cpu": cpu_model(), "machine": platform.machine(),
            "isa": simd.ISA, "advisor": _package_version(), "kernels": _kernels_digest(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def cache_path(key: dict | None = None) -> Path:
    from advisor.models.paths import advisor_home

    key = cache_key() if key is None else key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return advisor_home() / "kernel_speed" / f"{key['isa']}-{digest}.json"


def _time_pair(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, in interleaved rounds after a warm-up."""
    import torch

    with torch.no_grad():
        for fn in fns.values():
            fn()
            fn()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def measure(specs=CALIBRATION_SPECS, shape=SHAPE, repeats: int = REPEATS) -> dict[str, float]:
    """dtype -> (bf16 ``nn.Linear`` time) / (packed layer time) at batch 1 for a random weight
    of ``shape`` quantized by each spec; the two are timed alternately."""
    import torch

    from advisor.quantizers import QuantSpec, get_method

    out, inn = shape
    g = torch.Generator().manual_seed(0)
    W = torch.randn(out, inn, generator=g) * 0.02
    lin16 = torch.nn.Linear(inn, out, bias=False).to(torch.bfloat16)
    x = torch.randn(1, inn, generator=g)
    xb = x.to(torch.bfloat16)
    speeds = {}
    for s in specs:
        spec = QuantSpec.parse(s)
        layer = get_method(spec.method).fn(W, spec, None).pack()
        t = _time_pair({"q": lambda: layer(x), "bf16": lambda: lin16(xb)}, repeats)
        speeds[spec.dtype] = round(t["bf16"] / t["q"], 3)
    return speeds


def calibrate(specs=CALIBRATION_SPECS, shape=SHAPE, repeats: int = REPEATS) -> SpeedTable:
    """Measure (:func:`measure`) and write the cache file for this machine's key."""
    from advisor.kernels import simd

    key = cache_key()
    t0 = time.time()
    speeds = measure(specs, shape, repeats)
    doc = {"key": key, "speedup_vs_bf16_batch1": speeds, "shape": list(shape),
           "repeats": repeats, "seconds": round(time.time() - t0, 1),
           "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "isa_paths_runnable": simd.runnable_paths(),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    from advisor.kernels.io import atomic_write_text  # the project's one atomic write (unique temporary name)

    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return SpeedTable(speeds, True, key, str(path))


def cached() -> SpeedTable:
    """The cached calibration for this machine's key, or an unmeasured (empty) table."""
    key = cache_key()
    path = cache_path(key)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return SpeedTable({}, False, key, None)
    if doc.get("key") != key:
        return SpeedTable({}, False, key, None)
    return SpeedTable({k: float(v) for k, v in doc["speedup_vs_bf16_batch1"].items()}, True, key,
                      str(path))


def speeds(calibrate_if_missing: bool | None = None) -> SpeedTable:
    """This machine's table: the cache, else a calibration when allowed (see module doc)."""
    table = cached()
    if table.measured:
        return table
    if calibrate_if_missing is None:
        calibrate_if_missing = os.environ.get(CALIBRATION_ENV, "1") != "0"
    if not calibrate_if_missing:
        return table
    print(f"measuring packed-kernel speed on this machine (once; cached in "
          f"{cache_path(table.key).parent})", file=sys.stderr)
    return calibrate()


def main(argv=None) -> None:
    """``python -m advisor.kernel_speed``: (re)measure and print this machine's table."""
    table = calibrate()
    print(json.dumps({"key": table.key, "path": table.path,
                      "speedup_vs_bf16_batch1": table.speeds}, indent=1))


if __name__ == "__main__":
    main()
