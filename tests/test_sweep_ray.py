"""The Ray sweep engine on a local Ray instance (2 CPUs, one per module): the same rows as a local sweep,
a SIGKILLed worker is retried without a duplicate or a lost run, a failing spec is recorded as failed."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from tests.conftest import PTB, ROOT

pytestmark = pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")

SPECS = ["rtn:int8", "rtn:int4:g16", "gptq:int4:g16", "rtn:nf4:g16"]
# run_sweep validates every spec before any work, so no spec that reaches a worker fails on these models;
# this one is handed to the engine directly and fails in the worker, where the spec is parsed again
FAILING = "quantease-outlier:int4:o0.9"
COLUMNS = "spec, status, ppl, nll, dl, bits_per_weight, error"


def _protocol(**kw):
    from advisor.sweep import SweepProtocol

    return SweepProtocol(eval=f"file:{PTB}", calib=f"file:{PTB}", seq_len=32, max_windows=3, n_calib=2,
                         calib_seq_len=32, **kw)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray instance for the module, started from a folder outside the checkout (Ray puts the
    driver's working folder on its workers' sys.path, where the checkout's kernels/ would shadow Hugging Face's)."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("ray-cwd"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        os.chdir(here)


def _rows(path) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return sorted(con.execute(f"SELECT {COLUMNS} FROM runs").fetchall())
    finally:
        con.close()


def _same_rows(a: list[tuple], b: list[tuple]) -> None:
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for x, y in zip(a, b):
        assert x[2:6] == pytest.approx(y[2:6], rel=1e-5, abs=1e-7), (x, y)
        assert (x[6] is None) == (y[6] is None), (x, y)


def _integrity(path) -> str:
    con = sqlite3.connect(path)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def _local_sweep(folder, path, on_model=None):
    from advisor.store import Store
    from advisor.sweep import run_sweep

    store = Store(path)
    s = run_sweep([str(folder)], SPECS, store, _protocol(), progress=False, on_model=on_model)
    store.close()
    assert s.done == len(SPECS)
    return path


@pytest.fixture(scope="module")
def local_reference(tiny_folder, tmp_path_factory):
    """The same sweep with the local engine."""
    return _local_sweep(tiny_folder, tmp_path_factory.mktemp("local") / "runs.sqlite")


def test_ray_sweep_records_the_rows_of_a_local_sweep(local_ray, local_reference, tiny_folder, tmp_path):
    from advisor.store import Store
    from advisor.sweep import run_sweep

    store = Store(tmp_path / "ray.sqlite")
    s = run_sweep([str(tiny_folder)], SPECS, store, _protocol(), progress=False, engine="ray",
                  engine_options=dict(cpus_per_task=1))
    assert (s.done, s.failed, s.skipped) == (len(SPECS), 0, 0)
    _same_rows(_rows(store.path), _rows(local_reference))
    again = run_sweep([str(tiny_folder)], SPECS, store, _protocol(), progress=False, engine="ray")
    assert (again.done, again.failed, again.skipped) == (0, 0, len(SPECS))


def test_a_spec_failing_in_its_worker_is_recorded_as_failed_and_the_sweep_goes_on(local_ray, local_reference,
                                                                                   tiny_folder, tmp_path):
    from advisor.store import Store
    from advisor.sweep_ray import run_sweep_ray

    store = Store(tmp_path / "ray.sqlite")
    s = run_sweep_ray([str(tiny_folder)], [FAILING] + SPECS, store, _protocol(), progress=False, cpus_per_task=1)
    assert (s.done, s.failed, s.skipped) == (len(SPECS), 1, 0)
    _same_rows([r for r in _rows(store.path) if r[0] != FAILING], _rows(local_reference))
    failed = store.runs(status="failed")
    assert list(failed["spec"]) == [FAILING] and failed["error"][0].startswith("ValueError: option o"), failed["error"][0]


@pytest.mark.slow
def test_probes_and_baseline_are_measured_once_per_model_and_match_a_local_sweep(local_ray, tiny_folder, tmp_path):
    from advisor.probing import store_probes
    from advisor.store import Store
    from advisor.sweep import run_sweep

    ref = Store(_local_sweep(tiny_folder, tmp_path / "local.sqlite", on_model=store_probes))
    store = Store(tmp_path / "ray.sqlite")
    s = run_sweep([str(tiny_folder)], SPECS, store, _protocol(), progress=False, on_model=store_probes,
                  engine="ray", engine_options=dict(cpus_per_task=1))
    assert s.done == len(SPECS)
    _same_rows(_rows(store.path), _rows(ref.path))
    def table(st, q):
        return st._conn.execute(q).fetchall()

    for name in ("models", "baselines"):
        assert len(table(store, f"SELECT * FROM {name}")) == len(table(ref, f"SELECT * FROM {name}")) == 1
    assert table(store, "SELECT ppl FROM baselines")[0][0] == pytest.approx(table(ref, "SELECT ppl FROM baselines")[0][0])
    mine, theirs = (table(st, "SELECT settings_hash, features FROM probes ORDER BY settings_hash") for st in (store, ref))
    assert [h for h, _ in mine] == [h for h, _ in theirs] and len(mine) == 2
    for (_, a), (_, b) in zip(mine, theirs):
        assert json.loads(a) == pytest.approx(json.loads(b), rel=1e-4, abs=1e-8)
    # a second sweep finds the baseline and probe records the driver wrote: nothing is measured or probed again
    probed = table(store, "SELECT created_at FROM probes ORDER BY settings_hash")
    again = run_sweep([str(tiny_folder)], SPECS, store, _protocol(), progress=False, on_model=store_probes,
                      engine="ray", engine_options=dict(cpus_per_task=1))
    assert (again.done, again.failed, again.skipped) == (0, 0, len(SPECS))
    assert table(store, "SELECT created_at FROM probes ORDER BY settings_hash") == probed


def _descendants_of_this_process() -> dict[int, str]:
    """pid -> process title of every process below this one (the local Ray instance's raylet and workers)."""
    parent, title = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                title[int(d.name)] = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
    me, out = os.getpid(), {}
    for pid in parent:
        p, seen = parent[pid], 0
        while p > 1 and p != me and seen < 64:
            p, seen = parent.get(p, 0), seen + 1
        if p == me:
            out[pid] = title[pid]
    return out


def test_a_worker_killed_mid_sweep_is_retried_and_every_run_is_recorded_once(local_ray, local_reference, tiny_folder,
                                                                               tmp_path):
    from advisor.store import Store
    from advisor.sweep import run_sweep

    killed: list[str] = []

    def killer() -> None:  # SIGKILL the first worker seen measuring a spec
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid, title in _descendants_of_this_process().items():
                if title.startswith("ray::advisor-measure"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(title)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    store = Store(tmp_path / "ray.sqlite")
    s = run_sweep([str(tiny_folder)], SPECS, store, _protocol(), progress=False, engine="ray",
                  engine_options=dict(cpus_per_task=1, max_retries=2))
    thread.join(5)
    assert killed, "no measuring worker was seen to kill"
    assert (s.done, s.failed) == (len(SPECS), 0), s.errors
    rows = _rows(store.path)
    assert len({r[0] for r in rows}) == len(rows) == len(SPECS)
    _same_rows(rows, _rows(local_reference))
    assert _integrity(store.path) == "ok"


def test_a_task_whose_worker_keeps_dying_is_recorded_as_failed(local_ray, tiny_folder, tmp_path):
    """max_retries=0: the killed task is not retried; the sweep records it failed and goes on."""
    from advisor.store import Store
    from advisor.sweep import run_sweep

    killed: list[str] = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid, title in _descendants_of_this_process().items():
                if title.startswith("ray::advisor-measure"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(title.split()[-1])
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    store = Store(tmp_path / "ray.sqlite")
    s = run_sweep([str(tiny_folder)], SPECS[:3], store, _protocol(), progress=False, engine="ray",
                  engine_options=dict(cpus_per_task=1, max_retries=0))
    thread.join(5)
    assert killed
    failed = store.runs(status="failed")
    assert s.failed == len(failed) >= 1 and s.done + s.failed == 3
    assert all("worker died" in e for e in failed["error"]), list(failed["error"])
    assert store.count_runs() == 3 and _integrity(store.path) == "ok"


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "advisor.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, RAY_ADDRESS=""))


@pytest.mark.slow  # two CLI sweeps and a Ray instance of its own: a minute or more
def test_cli_contract_ray_engine_leaves_the_ok_runs_of_the_local_engine(tmp_path):
    common = ["sweep", "--models", "zoo:default", "--specs", "rtn:int8", "rtn:int4:g128", "--seq-len", "64",
              "--max-windows", "2", "--n-calib", "2", "--calib-seq-len", "64", "--no-probes", "--json"]
    local = _cli(*common, "--store", str(tmp_path / "local.sqlite"), cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    # the console script from the checkout's root: Ray's workers must not import the checkout's bare folders
    script = Path(sys.executable).with_name("advisor")
    remote = subprocess.run([str(script), *common, "--engine", "ray", "--jobs", "2", "--store",
                             str(tmp_path / "ray.sqlite")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, RAY_ADDRESS=""))
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert json.loads(remote.stdout)["done"] == 2
    a, b = _rows(tmp_path / "local.sqlite"), _rows(tmp_path / "ray.sqlite")
    assert [r[1] for r in a] == ["ok", "ok"]
    _same_rows(b, a)


def test_cli_help_documents_engine_and_address(tmp_path):
    out = _cli("sweep", "--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "--engine {local,ray}" in out.stdout and "--address" in out.stdout and "Ray cluster" in out.stdout


def test_ray_options_need_the_ray_engine(tmp_path):
    out = _cli("sweep", "--models", "zoo:default", "--address", "auto", "--store", str(tmp_path / "s.sqlite"),
               cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.strip() == "error: --address, --cpus-per-task and --gpus-per-task " \
                                                          "need --engine ray"
    assert not (tmp_path / "s.sqlite").exists()


@pytest.mark.slow  # three CLI sweeps, each starting its own Ray instance
def test_killing_the_driver_and_rerunning_resumes(tiny_folder, tmp_path):
    store = tmp_path / "ray.sqlite"
    specs = SPECS + ["gptq:int3:g16", "rtn:int3:g16", "gptq:int2:g16", "rtn:int2:g16"]
    cmd = [sys.executable, "-m", "advisor.cli", "sweep", "--models", str(tiny_folder), "--specs", *specs,
           "--eval", f"file:{PTB}", "--calib", f"file:{PTB}", "--seq-len", "32", "--max-windows", "3",
           "--n-calib", "2", "--calib-seq-len", "32", "--no-probes", "--engine", "ray", "--jobs", "2",
           "--store", str(store), "--json"]
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    n = 0
    while n == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            n = len(_rows(store)) if store.exists() else 0
        except sqlite3.OperationalError:  # the driver has not created the schema yet
            n = 0
    assert proc.poll() is None and n > 0, "the sweep ended, or recorded nothing, before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _rows(store)
    assert 0 < len(kept) < len(specs) and _integrity(store) == "ok"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["skipped"] == len(kept)
    rows = _rows(store)
    assert sorted(r[0] for r in rows) == sorted(specs) and all(r[1] == "ok" for r in rows)
    assert [r for r in rows if r[0] in {k[0] for k in kept}] == kept  # completed runs stay as they were


def test_a_task_this_machine_cannot_place_is_refused_instead_of_waiting(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = _cli("sweep", "--models", "zoo:default", "--specs", "rtn:int8", "--engine", "ray", "--gpus-per-task", "1",
               "--no-probes", "--store", str(tmp_path / "s.sqlite"), cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == "error: each task needs 1 GPUs but this machine's Ray instance has 0: lower --gpus-per-task or " \
                   "use --device cpu", out.stderr[-2000:]
    assert "Traceback" not in out.stderr
