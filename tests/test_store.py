from __future__ import annotations

import json
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


V1_RUNS = """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE models (fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, family TEXT, source_kind TEXT,
    n_params INTEGER, non_embedding_params INTEGER, info TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, model_fp TEXT NOT NULL REFERENCES models(fingerprint),
    model_name TEXT NOT NULL, spec TEXT NOT NULL, calib_hash TEXT NOT NULL, protocol_hash TEXT NOT NULL,
    seed INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL CHECK (status IN ('ok', 'failed')), ppl REAL,
    baseline_ppl REAL, nll REAL, baseline_nll REAL, dl REAL, bits_per_weight REAL, seconds REAL, packed INTEGER,
    source TEXT, error TEXT, calibration TEXT NOT NULL DEFAULT '{}', protocol TEXT NOT NULL DEFAULT '{}',
    versions TEXT NOT NULL DEFAULT '{}', extra TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL,
    UNIQUE (model_fp, spec, calib_hash, protocol_hash, seed));
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO models VALUES ('fp', 'm', 'llama', 'hf', 10, 5, '{}', 0);
INSERT INTO runs (model_fp, model_name, spec, calib_hash, protocol_hash, status, dl, created_at)
    VALUES ('fp', 'm', 'rtn:int8', 'c', 'p', 'ok', 0.01, 0);"""


def test_a_version_1_store_is_migrated_and_keeps_its_runs(tmp_path):
    import sqlite3

    from advisor.store import SCHEMA_VERSION, Store

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(V1_RUNS)
    con.close()
    store = Store(path)
    runs = store.runs()
    assert list(runs["dl"]) == [0.01] and runs["dl_se"].isna().all()
    assert store._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    store.add_run(model_fp="fp", model_name="m", spec="rtn:int4", calibration={"a": 1}, protocol={"b": 2},
                  status="ok", dl=0.2, dl_se=0.01, kld={"mean": 0.03, "p99": float("nan")})
    new = store.runs().iloc[-1]
    assert new["dl_se"] == 0.01 and new["kld_mean"] == 0.03 and json.loads(new["kld"]) == {"mean": 0.03, "p99": None}
    store.close()
    assert Store(path).count_runs() == 2  # reopening a migrated store is a no-op


def test_someone_elses_sqlite_file_is_refused_untouched(tmp_path):
    import sqlite3

    from advisor.models.errors import AdvisorError
    from advisor.store import Store

    path = tmp_path / "theirs.sqlite"
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL); INSERT INTO invoices VALUES (1, 9.5);")
    con.close()
    before = path.read_bytes()
    with pytest.raises(AdvisorError, match="not an advisor measurement store"):
        Store(path)
    assert path.read_bytes() == before
