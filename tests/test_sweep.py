"""Sweeps are resumable: killed with SIGKILL at random points, rerun, every run present exactly once."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.conftest import PTB

SPECS = ["rtn:int8", "rtn:int4:g16", "rtn:int3:g16", "rtn:int2:g16", "gptq:int4:g16", "gptq:int3:g16",
         "rtn:fp8_e4m3", "rtn:nf4:g16", "rtn:fp4_e2m1:g16", "gptq:int2:g16"]


def _sweep_cmd(folder, store):
    return [sys.executable, "-m", "advisor.cli", "sweep", "--models", str(folder), "--specs", *SPECS,
            "--eval", f"file:{PTB}", "--calib", f"file:{PTB}", "--seq-len", "32", "--max-windows", "3",
            "--n-calib", "2", "--calib-seq-len", "32", "--no-probes", "--store", str(store), "--json"]


def _rows(store):
    con = sqlite3.connect(store)
    rows = con.execute("SELECT spec, status, ppl, dl, bits_per_weight FROM runs").fetchall()
    con.close()
    return rows


@pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")
def test_sweep_killed_at_random_points_resumes_without_loss_or_duplicates(tiny_folder, tmp_path):
    store = tmp_path / "runs.sqlite"
    env = dict(os.environ)
    rng = random.Random(0)
    for trial in range(3):
        proc = subprocess.Popen(_sweep_cmd(tiny_folder, store), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 9.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = _rows(store) if store.exists() else []
        specs = [r[0] for r in rows]
        assert len(specs) == len(set(specs)), f"duplicate rows after kill {trial}"
        assert all(r[1] == "ok" and r[2] is not None and r[3] is not None for r in rows), "partial row"
    done = subprocess.run(_sweep_cmd(tiny_folder, store), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _rows(store)
    assert sorted(r[0] for r in rows) == sorted(SPECS)
    assert all(r[1] == "ok" and r[4] > 0 for r in rows)
    # a further run measures nothing new
    again = subprocess.run(_sweep_cmd(tiny_folder, store), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    import json

    assert json.loads(again.stdout)["done"] == 0 and len(_rows(store)) == len(SPECS)
