"""Hostile faults around sweeps: the parent of a `--jobs 2` sweep SIGKILLed (its workers must stop, silently),
and someone else's SQLite file passed as --store (refused, left byte for byte as it was)."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PTB

SPECS = [f"{m}:{d}:g{g}" for m in ("gptq", "rtn") for d in ("int4", "int3", "int2", "nf4", "fp4_e2m1")
         for g in (8, 16)]


def _advisor(*args):
    return [sys.executable, "-m", "advisor.cli", *args]


def _group_alive(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are still running (zombies waiting to be reaped count as gone)."""
    alive = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(d.name))
    return alive


def _runs(store: Path) -> int:
    if not store.exists():
        return 0
    con = sqlite3.connect(store, timeout=30)
    try:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        con.close()


@pytest.mark.slow  # two spawned workers importing torch: about a minute on a busy machine
@pytest.mark.skipif(not sys.platform.startswith("linux") or not PTB.exists(), reason="reads /proc; needs ../shared")
def test_workers_of_a_killed_sweep_stop_and_print_no_traceback(tiny_folder, tmp_path):
    store = tmp_path / "runs.sqlite"
    err = (tmp_path / "stderr.txt").open("w")
    cmd = _advisor("sweep", "--models", str(tiny_folder), "--specs", *SPECS, "--jobs", "2", "--eval", f"file:{PTB}",
                   "--calib", f"file:{PTB}", "--seq-len", "32", "--max-windows", "4", "--n-calib", "2",
                   "--calib-seq-len", "32", "--no-probes", "--store", str(store))
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while _runs(store) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before its workers were seen measuring"
        assert _runs(store) > 0, "no worker recorded a run in time"
        workers = [p for p in _group_alive(proc.pid) if p != proc.pid]
        assert workers, "no worker processes found"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()  # the workers' result pipe and the parent's stdout are both broken now
        deadline = time.monotonic() + 20
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_alive(proc.pid) == [], "orphaned workers kept running after their parent was killed"
        n = _runs(store)
        time.sleep(1.0)
        assert _runs(store) == n < len(SPECS)
    finally:
        for pid in _group_alive(proc.pid):
            os.kill(pid, signal.SIGKILL)
        err.close()
    text = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in text and "BrokenPipeError" not in text, text[-3000:]
    con = sqlite3.connect(store)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    specs = [r[0] for r in con.execute("SELECT spec FROM runs")]
    con.close()
    assert len(specs) == len(set(specs))


def _foreign_db(path: Path, schema: str) -> bytes:
    con = sqlite3.connect(path)
    con.executescript(schema)
    con.commit()
    con.close()
    return path.read_bytes()


@pytest.mark.parametrize("schema", [
    "CREATE TABLE people (name TEXT, email TEXT); INSERT INTO people VALUES ('ada', 'ada@example.org');",
    "CREATE TABLE meta (k TEXT, v TEXT); INSERT INTO meta VALUES ('owner', 'someone else');",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); INSERT INTO meta VALUES ('app', 'theirs');",
], ids=["other-tables", "meta-of-another-shape", "meta-without-schema-version"])
def test_a_foreign_sqlite_store_is_refused_untouched(tmp_path, schema):
    path = tmp_path / "theirs.db"
    before = _foreign_db(path, schema)
    mtime = path.stat().st_mtime_ns
    out = subprocess.run(_advisor("sweep", "--models", "zoo:default", "--specs", "rtn:int8", "--store", str(path)),
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], out.stderr
    assert "not an advisor measurement store" in lines[0] and "Traceback" not in out.stderr
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.db"]  # no -wal / -shm beside it


def test_advisor_stores_and_new_files_still_open(tmp_path):
    from advisor.store import Store

    Store(tmp_path / "new.sqlite").close()
    Store(tmp_path / "new.sqlite").close()  # reopening its own store
    (tmp_path / "empty.sqlite").touch()
    Store(tmp_path / "empty.sqlite").close()  # an empty file is an empty database: it becomes a store
