"""Sweeps: quantize and measure every (model, spec) pair not yet in the measurement store.

Resumable by construction: a run row is written (one transaction) only after its measurement is
complete, and pairs already in the store are skipped, so an interrupted sweep (Ctrl-C, SIGKILL,
power loss) is simply run again. A spec that fails (e.g. a format a method does not support) is
recorded as ``failed`` with its error so it is not retried every time (``retry_failed`` does).
Sweeps measure the fake-quantized model (dequantized weights in ``nn.Linear``): tests show the
packed kernels give the same perplexity within float rounding, and this is faster to evaluate.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from advisor.protocol import Protocol
from advisor.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepProtocol(Protocol):
    """A sweep's :class:`advisor.protocol.Protocol` with the device its models load on: one value that
    travels to every worker (local processes or Ray tasks). The device is not part of any fingerprint."""

    device: str = "cpu"


@dataclass
class SweepSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ModelSession:
    """One loaded model with its windows, baseline and pristine weights, ready to measure specs.

    The windows and baseline come from :func:`advisor.api.prepare` with the sweep's protocol, so a
    sweep measures exactly what plan, predict and recommend measure."""

    def __init__(self, name: str, protocol: Protocol, store: Store, progress: bool = False):
        from advisor.api import prepare

        self.name, self.protocol, self.store, self.progress = name, protocol, store, progress
        ctx = prepare(name, protocol, device=getattr(protocol, "device", "cpu"), store=store, progress=progress,
                      probes=False)
        self.loaded, self.eval, self.calib, self.fp = ctx.loaded, ctx.eval, ctx.calib, ctx.loaded.source.fingerprint
        self.baseline_ppl, self.baseline_nll = ctx.baseline_ppl, ctx.baseline_nll
        self._pristine = {n: layer.weight.data.clone() for n, layer in self.loaded.adapter.linear_layers()}
        self._reference = None

    @property
    def reference(self):
        """The baseline's bounded next-token distributions on the evaluation windows (for KL statistics),
        measured on first use: a sweep whose pairs are all in the store never pays for it."""
        if self._reference is None:
            from advisor.models.evaluate import DEFAULT_TOP_K, perplexity

            r = perplexity(self.loaded.model, self.eval, batch_size=self.protocol.batch_size, progress=self.progress,
                           desc=f"{self.name} baseline", top_k=DEFAULT_TOP_K)
            self._reference = r.reference
        return self._reference

    def restore(self) -> None:
        with torch.no_grad():
            for n, layer in self.loaded.adapter.linear_layers():
                layer.weight.data.copy_(self._pristine[n])

    def has(self, spec: str, include_failed: bool = True) -> bool:
        return self.store.has_run(self.fp, spec, self.calib.protocol, self.eval.protocol, self.protocol.seed,
                                  include_failed=include_failed)

    def measure(self, spec: str, source: str = "sweep") -> dict[str, Any]:
        """Quantize (fake-quant), evaluate, record one run; weights are restored afterwards."""
        from advisor.models.evaluate import paired_se, perplexity
        from advisor.models.pipeline import quantize_model
        from advisor.models.saving import package_versions

        reference = self.reference  # before the weights change
        t0 = time.perf_counter()
        row: dict[str, Any] = dict(model_fp=self.fp, model_name=self.name, spec=spec, calibration=self.calib.protocol,
                                   protocol=self.eval.protocol, seed=self.protocol.seed, baseline_ppl=self.baseline_ppl,
                                   baseline_nll=self.baseline_nll, versions=package_versions(), source=source, packed=0)
        try:
            q = quantize_model(self.loaded, spec, self.calib, pack=False, progress=self.progress)
            r = perplexity(self.loaded.model, self.eval, batch_size=self.protocol.batch_size, progress=self.progress,
                           desc=f"{self.name} {spec}", reference=reference)
            row.update(status="ok", ppl=r.ppl, nll=r.nll, dl=r.nll - self.baseline_nll,
                       dl_se=paired_se(r.window_nll, reference.window_nll), kld=r.kld.to_dict(),
                       bits_per_weight=q.bits_per_weight,
                       extra={"quantize_seconds": q.seconds, "eval_seconds": r.seconds,
                              "mean_rel_error": _mean([x.rel_error for x in q.layers])})
        except (ValueError, RuntimeError) as e:  # unsupported combination or numerical failure: record it
            row.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
        finally:
            self.restore()
        row["seconds"] = time.perf_counter() - t0
        self.store.add_run(**row)
        return row


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


ENGINES = ("local", "ray")


def run_sweep(models: list[str], specs: list[str], store: Store, protocol: Protocol = Protocol(), *,
              jobs: int = 1, retry_failed: bool = False, progress: bool = True,
              on_model: Callable[[ModelSession], None] | None = None, engine: str = "local",
              address: str | None = None, engine_options: dict[str, Any] | None = None) -> SweepSummary:
    """Measure every (model, spec) pair missing from ``store``.

    Args:
        models: model names (anything :func:`models.load` accepts).
        specs: spec strings.
        jobs: worker processes (each gets ``cores / jobs`` threads); 1 runs in this process. With
            ``engine="ray"`` on a new local Ray instance: tasks at once.
        retry_failed: re-measure pairs recorded as failed.
        on_model: called once per loaded model (e.g. to run and store probes); with Ray it runs in
            the model's prepare task, so it must be picklable (a module-level function).
        engine: ``"local"`` (this process and ``jobs`` worker processes) or ``"ray"`` (Ray tasks,
            :mod:`advisor.sweep_ray`; this process stays the store's only writer).
        address: the Ray cluster for ``engine="ray"`` (None: ``RAY_ADDRESS`` or a new local instance).
        engine_options: more keyword arguments of :func:`advisor.sweep_ray.run_sweep_ray`
            (``cpus_per_task``, ``gpus_per_task``, ``max_retries``, ``runtime_env``).
    """
    from tqdm.auto import tqdm

    from advisor.quantizers import QuantSpec

    if engine not in ENGINES:
        raise ValueError(f"unknown sweep engine {engine!r}; known: {', '.join(ENGINES)}")
    if address and engine != "ray":
        raise ValueError("a Ray address needs engine='ray' (--engine ray)")
    specs = [str(QuantSpec.parse(s)) for s in specs]  # validate all before any work
    if not isinstance(protocol, SweepProtocol):  # the device travels with the protocol to every worker
        protocol = SweepProtocol(**protocol.to_dict())
    if engine == "ray":
        from advisor.sweep_ray import run_sweep_ray

        return run_sweep_ray(models, specs, store, protocol, address=address, jobs=jobs, retry_failed=retry_failed,
                             progress=progress, on_model=on_model, **(engine_options or {}))
    summary = SweepSummary()
    t0 = time.perf_counter()
    if jobs > 1:
        return _run_parallel(models, specs, store, protocol, jobs, retry_failed, progress, on_model)
    for name in models:
        session = ModelSession(name, protocol, store, progress=False)
        if on_model:
            on_model(session)
        todo = [s for s in specs if not session.has(s, include_failed=not retry_failed)]
        summary.skipped += len(specs) - len(todo)
        for spec in tqdm(todo, desc=f"sweep {name}", unit="run", disable=not progress):
            row = session.measure(spec)
            if row["status"] == "ok":
                summary.done += 1
            else:
                summary.failed += 1
                summary.errors.append(f"{name} {spec}: {row.get('error')}")
        del session
    summary.seconds = time.perf_counter() - t0
    return summary


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: this worker stops when the sweep's process dies, silently.

    On Linux the kernel sends SIGTERM at the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere a
    daemon thread polls the parent pid. A write to a pipe whose reader died ends the worker without a
    traceback (SIGPIPE's default action) instead of raising BrokenPipeError.
    """
    import signal
    import sys
    import threading

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _worker(args: tuple) -> dict[str, Any]:
    models, specs, store_path, protocol, retry_failed, threads = args
    torch.set_num_threads(threads)
    store = Store(store_path)
    s = run_sweep(models, specs, store, protocol, jobs=1, retry_failed=retry_failed, progress=False)
    return s.to_dict()


def _run_parallel(models, specs, store, protocol, jobs, retry_failed, progress, on_model) -> SweepSummary:
    import multiprocessing as mp

    # baselines and probes first, in this process, so workers never race to compute them
    for name in models:
        session = ModelSession(name, protocol, store, progress=False)
        if on_model:
            on_model(session)
        del session
    threads = max(1, (os.cpu_count() or 1) // jobs)
    tasks = [(models, specs[k::jobs], str(store.path), protocol, retry_failed, threads) for k in range(jobs)]
    summary = SweepSummary()
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(jobs, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        for part in pool.imap_unordered(_worker, tasks):
            summary.done += part["done"]
            summary.skipped += part["skipped"]
            summary.failed += part["failed"]
            summary.errors += part["errors"]
    summary.seconds = time.perf_counter() - t0
    return summary
