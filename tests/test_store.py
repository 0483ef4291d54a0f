from __future__ import annotations

import sqlite3

import pytest

from advisor.store import Store
from advisor.models.errors import AdvisorError

CAL = {"dataset": "stdlib-code", "split": "calib", "text_sha256": "a", "seq_len": 64, "n_windows": 4, "seed": 0}
EVAL = {"dataset": "stdlib-code", "split": "eval", "text_sha256": "b", "seq_len": 64, "n_windows": 5}


def _run(**kw):
    row = dict(model_fp="fp1", model_name="m", spec="rtn:int4:g128", calibration=CAL, protocol=EVAL, status="ok",
               ppl=11.0, baseline_ppl=10.0, nll=2.40, baseline_nll=2.30, bits_per_weight=4.125, seconds=1.0)
    row.update(kw)
    return row


def test_runs_are_unique_and_complete(tmp_path):
    store = Store(tmp_path / "m.sqlite")
    store.add_model("fp1", "m", family="llama", n_params=100)
    assert store.add_run(**_run())
    assert not store.add_run(**_run(ppl=12.0))  # same key: ignored, not duplicated
    assert store.add_run(**_run(spec="gptq:int4:g128"))
    df = store.runs()
    assert len(df) == 2 and df["family"].tolist() == ["llama", "llama"]
    assert df["dl"].iloc[0] == pytest.approx(0.10)
    assert store.has_run("fp1", "rtn:int4:g128", CAL, EVAL)
    assert not store.has_run("fp1", "rtn:int3:g128", CAL, EVAL)


def test_failed_transaction_leaves_nothing(tmp_path):
    store = Store(tmp_path / "m.sqlite")
    store.add_model("fp1", "m")
    with pytest.raises(RuntimeError):
        with store.transaction() as c:
            c.execute("INSERT INTO baselines VALUES ('fp1','h','{}',1,0,1,1,0)")
            raise RuntimeError("crash mid-write")
    assert store._conn.execute("SELECT COUNT(*) FROM baselines").fetchone()[0] == 0


def test_export_csv_and_parquet(tmp_path):
    store = Store(tmp_path / "m.sqlite")
    store.add_model("fp1", "m")
    store.add_run(**_run())
    import pandas as pd

    assert len(pd.read_csv(store.export(tmp_path / "runs.csv"))) == 1
    assert len(pd.read_parquet(store.export(tmp_path / "runs.parquet"))) == 1


def test_corrupted_store_is_explained(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(AdvisorError, match="corrupted"):
        Store(bad)


def test_locked_store_is_explained(tmp_path):
    path = tmp_path / "m.sqlite"
    Store(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(AdvisorError, match="locked"):
            Store(path, timeout_s=0.2).add_model("fp", "m")
    finally:
        other.execute("ROLLBACK")
