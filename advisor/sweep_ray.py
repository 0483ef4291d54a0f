"""The Ray engine of sweeps (``advisor sweep --engine ray``): each model's preparation (load, baseline,
probes) and each (model, spec) measurement is a Ray task; this process, the driver, is the store's only writer.

- **Tasks.** A *prepare* task loads one model, measures its baseline and runs the ``on_model`` hook (the
  probes) once; a *measure* task quantizes and evaluates one spec. Both build the same
  :class:`advisor.sweep.ModelSession` as a local sweep, but against a :class:`RecordingStore`: a snapshot of
  what the store already holds (so a cached baseline or probe record is reused, not recomputed) that
  records writes instead of making them. The task returns those writes, or the run record, and the
  driver applies them to the store as tasks finish, in the store's own transactions and uniqueness rules.
  Each worker process keeps its last model loaded, so a worker that measures several specs of one
  model loads it once; the baseline is measured once per model and handed to every measure task.
- **Resources.** Each task declares ``num_cpus`` (the torch threads it uses), ``num_gpus`` (1 by default
  when the protocol's device is CUDA) and ``memory``: from the model files' parameter count before
  the model is loaded, then from the loaded model's (weights and their pristine copy, in float32).
- **Faults.** A task whose worker process dies (SIGKILL, a node lost) is retried by Ray up to
  ``max_retries`` times; only the attempt that returns is recorded, and ``INSERT OR IGNORE`` on the
  run's unique key backs that up. A task that fails for its own reason (an unsupported spec, out of
  memory, a worker that keeps dying) is recorded as ``failed`` with its error and the sweep goes on.
  Nothing is written before a run is complete, so killing the driver and starting the same sweep
  again measures only what is missing (Ray cancels a dead driver's tasks).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from advisor.models.errors import AdvisorError
from advisor.store import Store, protocol_key, stable_hash

log = logging.getLogger(__name__)

_MIB = 2**20
_TASK_OVERHEAD_BYTES = 512 * _MIB  # torch, transformers and the windows, beside the weights


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise AdvisorError("--engine ray needs Ray, which is not installed: pip install 'advisor[ray]' "
                           "(or use --engine local)") from e
    return ray


# -- the store seen from a worker ---------------------------------------------------------------------
class RecordingStore:
    """The part of :class:`Store` a :class:`ModelSession` and the probe hook use, for a worker.

    Reads answer from a snapshot of the driver's store (baselines and probe records); writes are
    recorded in ``writes`` as ``(method, args, kwargs)``, to be applied by the driver, and are also
    visible to later reads. ``has_run`` answers False: the driver decides what to measure.
    """

    def __init__(self, snapshot: dict[str, dict] | None = None):
        snapshot = snapshot or {}
        self._baselines: dict[tuple[str, str], dict] = dict(snapshot.get("baselines", {}))
        self._probes: dict[tuple[str, str], dict] = dict(snapshot.get("probes", {}))
        self.writes: list[tuple[str, tuple, dict]] = []

    def add_model(self, *args: Any, **kwargs: Any) -> None:
        self.writes.append(("add_model", args, kwargs))

    def add_baseline(self, model_fp: str, protocol: dict, ppl: float, nll: float, n_tokens: int,
                     seconds: float | None = None) -> None:
        self.writes.append(("add_baseline", (model_fp, protocol, ppl, nll, n_tokens, seconds), {}))
        self._baselines[(model_fp, stable_hash(protocol_key(protocol)))] = dict(
            model_fp=model_fp, protocol=protocol, ppl=ppl, nll=nll, n_tokens=n_tokens, seconds=seconds)

    def add_probe(self, model_fp: str, settings: dict, features: dict, provenance: dict,
                  seconds: float | None = None) -> None:
        self.writes.append(("add_probe", (model_fp, settings, features, provenance, seconds), {}))
        self._probes[(model_fp, stable_hash(settings))] = dict(features=features, provenance=provenance)

    def add_run(self, **row: Any) -> bool:  # the measure task returns the row itself
        return True

    def has_run(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def baseline(self, model_fp: str, protocol: dict) -> dict | None:
        return self._baselines.get((model_fp, stable_hash(protocol_key(protocol))))

    def probe(self, model_fp: str, settings: dict) -> dict | None:
        return self._probes.get((model_fp, stable_hash(settings)))


def store_snapshot(store: Store) -> dict[str, dict]:
    """The baselines and probe records of ``store``, keyed as :class:`RecordingStore` looks them up."""
    import json

    con = store._conn  # read-only queries on the driver's connection
    baselines = {(r["model_fp"], r["protocol_hash"]): dict(ppl=r["ppl"], nll=r["nll"], n_tokens=r["n_tokens"])
                 for r in con.execute("SELECT model_fp, protocol_hash, ppl, nll, n_tokens FROM baselines")}
    probes = {(r["model_fp"], r["settings_hash"]): dict(features=json.loads(r["features"]),
                                                        provenance=json.loads(r["provenance"]))
              for r in con.execute("SELECT model_fp, settings_hash, features, provenance FROM probes")}
    return {"baselines": baselines, "probes": probes}


# -- what runs in a worker --------------------------------------------------------------------------
_SESSION: dict[str, Any] = {}  # this worker process's loaded model: {"key": ..., "session": ModelSession}


def _session(name: str, protocol, snapshot: dict | None, threads: int):
    """The worker's :class:`ModelSession` for ``(name, protocol)``, loading it only when it is not the last one."""
    import torch

    from advisor.sweep import ModelSession

    torch.set_num_threads(max(1, threads))
    key = repr((name, protocol))
    store = RecordingStore(snapshot)
    if _SESSION.get("key") != key:
        _SESSION.clear()  # one model per worker at a time
        session = ModelSession(name, protocol, store, progress=False)
        _SESSION.update(key=key, session=session)
    session = _SESSION["session"]
    session.store = store
    return session


def _prepare(name: str, protocol, snapshot: dict, threads: int, on_model: Callable | None) -> dict[str, Any]:
    """Load ``name``, measure its baseline (unless the snapshot has it) and run ``on_model``; return the writes."""
    t0 = time.perf_counter()
    _SESSION.clear()  # always a fresh load: the preparation is what records the model
    session = _session(name, protocol, snapshot, threads)
    if on_model:
        on_model(session)
    base = session.store.baseline(session.fp, session.eval.protocol)
    return dict(writes=session.store.writes, fp=session.fp, calibration=session.calib.protocol,
                protocol=session.eval.protocol, n_params=session.loaded.n_params(),
                baseline={(session.fp, stable_hash(protocol_key(session.eval.protocol))): dict(base)},
                seconds=time.perf_counter() - t0, pid=os.getpid())


def _measure(name: str, protocol, baseline: dict, spec: str, threads: int) -> dict[str, Any]:
    """Quantize and evaluate one spec on the worker's session of ``name``; return the run record.

    ``baseline`` is the prepare task's ``{(fingerprint, protocol hash): baseline}``: a session kept from an
    earlier sweep whose model files have changed since (another fingerprint) is loaded again."""
    ((fp, _), base), = baseline.items()
    session = _session(name, protocol, {"baselines": baseline}, threads)
    if session.fp != fp:
        _SESSION.clear()
        session = _session(name, protocol, {"baselines": baseline}, threads)
    session.baseline_ppl, session.baseline_nll = float(base["ppl"]), float(base["nll"])
    return session.measure(spec)


# -- the driver -------------------------------------------------------------------------------------
def _estimate_memory(name: str) -> int | None:
    """Bytes a worker needs to load ``name`` in float32, from its files' headers (None when unknown here)."""
    from advisor.models.loading import resolve
    from advisor.models.memory import model_numel

    try:
        kind, target, _ = resolve(name)
        if kind == "hub":
            return None  # the files may exist only on the workers (their Hugging Face cache)
        numel = model_numel(kind, target)
    except (AdvisorError, OSError):
        return None  # not visible from the driver: the worker's own preflight checks it
    return None if numel is None else int(numel * 4 * 1.2) + _TASK_OVERHEAD_BYTES


def _failed_row(name: str, prep: dict, protocol, spec: str, error: str) -> dict[str, Any]:
    from advisor.models.saving import package_versions

    (base,) = prep["baseline"].values()
    return dict(model_fp=prep["fp"], model_name=name, spec=spec, calibration=prep["calibration"],
                protocol=prep["protocol"], seed=protocol.seed, baseline_ppl=base["ppl"], baseline_nll=base["nll"],
                versions=package_versions(), source="sweep", packed=0, status="failed", error=error[:500])


def _task_error(e: BaseException) -> str:
    """One line for a task's failure: its own exception, or why Ray gave up on it."""
    ray = _import_ray()
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    if isinstance(e, ray.exceptions.OutOfMemoryError):
        return f"out of memory: Ray killed the worker ({str(e).splitlines()[0][:200]})"
    died = tuple(getattr(ray.exceptions, n) for n in ("WorkerCrashedError", "NodeDiedError", "ActorDiedError")
                 if hasattr(ray.exceptions, n))
    if isinstance(e, died):
        return f"worker died and its retries ran out ({type(e).__name__})"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def connect(address: str | None, num_cpus: int | None = None, runtime_env: dict | None = None) -> bool:
    """Connect to Ray: an instance this process already started, ``address``, ``RAY_ADDRESS``, or a new
    local instance of ``num_cpus`` CPUs. Returns True when this call connected (the caller shuts it down)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(runtime_env=runtime_env) if runtime_env else {}
    here = Path.cwd()
    # Ray puts the driver's working folder on its workers' sys.path. From the root of an advisor source
    # checkout that would make its bare layer folders (advisor/ without advisor.kernels, kernels/ shadowing
    # Hugging Face's `kernels`) importable ahead of the installed package, so connect from elsewhere.
    checkout = (here / "advisor" / "__init__.py").is_file() and (here / "kernels" / "__init__.py").is_file()
    try:
        if checkout:
            os.chdir(tempfile.gettempdir())
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, **kwargs)
        else:  # "local": never attach to some other Ray instance found on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    except ConnectionError as e:
        raise AdvisorError(f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS')} "
                           f"({e}); check --address (or RAY_ADDRESS) and that the cluster is up (`ray status`)") from e
    finally:
        os.chdir(here)
    return True


def run_sweep_ray(models: list[str], specs: list[str], store: Store, protocol, *, address: str | None = None,
                  jobs: int = 1, retry_failed: bool = False, progress: bool = True,
                  on_model: Callable | None = None, cpus_per_task: float | None = None,
                  gpus_per_task: float | None = None, max_retries: int = 3,
                  runtime_env: dict | None = None):
    """Measure every (model, spec) pair missing from ``store`` with Ray tasks (see the module docstring).

    Args:
        address: the Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); None = ``RAY_ADDRESS``
            or, when unset, a new local instance of this machine's cores. An instance this process
            already started (``ray.init``) is used as is.
        jobs: on a new local instance, how many tasks run at once (each gets ``cores / jobs`` threads).
        cpus_per_task: CPUs (torch threads) each task declares; default ``cores / jobs`` locally, 1 on a cluster.
        gpus_per_task: GPUs each task declares; default 1 when ``protocol.device`` is CUDA, else 0.
        max_retries: how many times Ray reruns a task whose worker died, before it is recorded as failed.
        runtime_env: Ray runtime environment for the tasks (e.g. ``{"pip": ["advisor[ray]"]}``).
    """
    from tqdm.auto import tqdm

    from advisor.sweep import SweepSummary

    ray = _import_ray()
    cores = os.cpu_count() or 1
    local = not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    started = connect(address, num_cpus=cores if local else None, runtime_env=runtime_env)
    if cpus_per_task is None:
        cpus_per_task = max(1, cores // jobs) if local else 1
    if gpus_per_task is None:
        gpus_per_task = 1 if str(protocol.device).startswith("cuda") else 0
    threads = max(1, int(cpus_per_task))
    mem_cap = None
    if local:  # no autoscaler can add what this machine lacks: a task it cannot place would wait forever
        have = ray.cluster_resources()
        for what, need in (("CPU", cpus_per_task), ("GPU", gpus_per_task)):
            if need > have.get(what, 0):
                if started:
                    ray.shutdown()
                raise AdvisorError(f"each task needs {need:g} {what}s but this machine's Ray instance has "
                                   f"{have.get(what, 0):g}: lower --{what.lower()}s-per-task"
                                   + (" or use --device cpu" if what == "GPU" else ""))
        mem_cap = int(have.get("memory", 0)) or None  # beyond it the worker's own preflight refuses the model
    base_opts = dict(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=max_retries,
                     retry_exceptions=False)
    prepare = ray.remote(_prepare)
    measure = ray.remote(_measure)
    summary = SweepSummary()
    t0 = time.perf_counter()
    pending: dict[Any, tuple] = {}  # ObjectRef -> ("prepare", name) | ("measure", name, spec, prep)
    bar = tqdm(total=0, desc="sweep (ray)", unit="run", disable=not progress)
    try:
        snapshot = ray.put(store_snapshot(store))
        for name in models:
            mem = _estimate_memory(name)
            mem = min(mem, mem_cap) if mem and mem_cap else mem
            opts = dict(base_opts, name=f"advisor-prepare {name}", **({"memory": mem} if mem else {}))
            pending[prepare.options(**opts).remote(name, protocol, snapshot, threads, on_model)] = ("prepare", name)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            job = pending.pop(ref)
            try:
                result, error = ray.get(ref), None
            except (ray.exceptions.RayError, ray.exceptions.RayTaskError) as e:
                result, error = None, _task_error(e)
            if job[0] == "prepare":
                name = job[1]
                if error:
                    summary.failed += len(specs)
                    summary.errors.append(f"{name}: could not be prepared: {error}")
                    continue
                for method, args, kwargs in result["writes"]:
                    getattr(store, method)(*args, **kwargs)
                todo = [s for s in specs if not store.has_run(result["fp"], s, result["calibration"], result["protocol"],
                                                              protocol.seed, include_failed=not retry_failed)]
                summary.skipped += len(specs) - len(todo)
                mem = int(result["n_params"] * 4 * 2 * 1.2) + _TASK_OVERHEAD_BYTES  # weights + pristine copy
                mem = min(mem, mem_cap) if mem_cap else mem
                opts = dict(base_opts, memory=mem)
                bar.total += len(todo)
                bar.refresh()
                for spec in todo:
                    r = measure.options(name=f"advisor-measure {name} {spec}", **opts).remote(
                        name, protocol, result["baseline"], spec, threads)
                    pending[r] = ("measure", name, spec, result)
            else:
                _, name, spec, prep = job
                row = result if error is None else _failed_row(name, prep, protocol, spec, error)
                store.add_run(**row)
                if row["status"] == "ok":
                    summary.done += 1
                else:
                    summary.failed += 1
                    summary.errors.append(f"{name} {spec}: {row.get('error')}")
                bar.update(1)
                bar.set_postfix(done=summary.done, failed=summary.failed, refresh=False)
    except BaseException:
        for r in pending:
            ray.cancel(r, force=True)
        raise
    finally:
        bar.close()
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    return summary
