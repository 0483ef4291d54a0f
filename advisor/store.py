"""The measurement store: SQLite (WAL mode) holding models, baselines, probe records and runs.

Every write is one transaction, and a run row is inserted only once its measurement is complete,
so a sweep killed at any point leaves only whole rows; rerunning it skips what is already there.
Uniqueness constraints make a repeated insert a no-op instead of a duplicate.
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from advisor.models.errors import AdvisorError

SCHEMA_VERSION = 2
# Each step brings a store of the version before it to the next one, in one transaction.
MIGRATIONS = {
    1: ("ALTER TABLE runs ADD COLUMN dl_se REAL",
        "ALTER TABLE runs ADD COLUMN kld_mean REAL",
        "ALTER TABLE runs ADD COLUMN kld TEXT NOT NULL DEFAULT '{}'"),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    fingerprint TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    family TEXT,
    source_kind TEXT,
    n_params INTEGER,
    non_embedding_params INTEGER,
    info TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS baselines (
    model_fp TEXT NOT NULL REFERENCES models(fingerprint),
    protocol_hash TEXT NOT NULL,
    protocol TEXT NOT NULL,
    ppl REAL NOT NULL,
    nll REAL NOT NULL,
    n_tokens INTEGER NOT NULL,
    seconds REAL,
    created_at REAL NOT NULL,
    PRIMARY KEY (model_fp, protocol_hash)
);
CREATE TABLE IF NOT EXISTS probes (
    model_fp TEXT NOT NULL REFERENCES models(fingerprint),
    settings_hash TEXT NOT NULL,
    features TEXT NOT NULL,
    provenance TEXT NOT NULL,
    seconds REAL,
    created_at REAL NOT NULL,
    PRIMARY KEY (model_fp, settings_hash)
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_fp TEXT NOT NULL REFERENCES models(fingerprint),
    model_name TEXT NOT NULL,
    spec TEXT NOT NULL,
    calib_hash TEXT NOT NULL,
    protocol_hash TEXT NOT NULL,
    seed INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    ppl REAL,
    baseline_ppl REAL,
    nll REAL,
    baseline_nll REAL,
    dl REAL,
    dl_se REAL,
    kld_mean REAL,
    kld TEXT NOT NULL DEFAULT '{}',
    bits_per_weight REAL,
    seconds REAL,
    packed INTEGER,
    source TEXT,
    error TEXT,
    calibration TEXT NOT NULL DEFAULT '{}',
    protocol TEXT NOT NULL DEFAULT '{}',
    versions TEXT NOT NULL DEFAULT '{}',
    extra TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    UNIQUE (model_fp, spec, calib_hash, protocol_hash, seed)
);
"""

RUN_COLUMNS = ("model_fp", "model_name", "spec", "calib_hash", "protocol_hash", "seed", "status", "ppl",
               "baseline_ppl", "nll", "baseline_nll", "dl", "dl_se", "kld_mean", "kld", "bits_per_weight", "seconds",
               "packed", "source", "error", "calibration", "protocol", "versions", "extra")


def stable_hash(obj: Any) -> str:
    """Short, stable hash of a JSON-able object (protocols, settings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def protocol_key(protocol: dict[str, Any]) -> dict[str, Any]:
    """The parts of a window protocol that define what was measured (not timings or paths)."""
    keys = ("dataset", "split", "format", "text_sha256", "tokenizer", "seq_len", "n_windows", "windows",
            "seed", "region_start_token", "add_special_tokens", "bos_token_id")
    return {k: protocol.get(k) for k in keys if k in protocol}


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _finite_tree(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (stored JSON stays strict)."""
    if isinstance(x, dict):
        return {k: _finite_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_tree(v) for v in x]
    return _finite_or_none(x)


@dataclass
class Store:
    """A measurement store at ``path`` (created with its schema on first use).

    Raises:
        AdvisorError: the file is not a SQLite database (corrupted), is locked past the timeout, or
            was written by an incompatible schema version.
    """

    path: Path
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()
        try:
            self._refuse_foreign()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:  # someone else's database: refused before anything is written
                self._conn.close()
                raise AdvisorError(f"{self.path} is a SQLite database but not an advisor measurement store (no meta "
                                   "table; it was left untouched); point --store at a new file")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self.transaction() as c:
                has_runs = c.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone()
                row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() if has_runs else None
                version = int(row["value"]) if row is not None else None
                while version is not None and version in MIGRATIONS:  # an older store: bring it up to date
                    for stmt in MIGRATIONS[version]:
                        c.execute(stmt)
                    version += 1
                    c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                if version is None:
                    c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif version != SCHEMA_VERSION:
                    raise AdvisorError(f"measurement store {self.path} has schema version {version}, this advisor "
                                       f"reads version {SCHEMA_VERSION}: export it with the version that wrote it, or "
                                       "use a new --store path")
        except sqlite3.DatabaseError as e:
            raise self._explain(e) from e
        except OSError as e:
            raise AdvisorError(f"cannot open the measurement store {self.path}: {e}") from e

    def _refuse_foreign(self) -> None:
        """Refuse, before anything is written to it, a SQLite file with tables but no advisor schema version."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=self.timeout_s)
        try:
            tables = sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'"))
            try:
                ours = "meta" in tables and con.execute("SELECT 1 FROM meta WHERE key='schema_version'").fetchone()
            except sqlite3.OperationalError:  # a `meta` table of another shape
                ours = None
        finally:
            con.close()
        if tables and not ours:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise AdvisorError(f"{self.path} is a SQLite database that is not an advisor measurement store (its tables: "
                               f"{shown}); it was left untouched: point --store at a new file or at an advisor store")

    def _explain(self, e: sqlite3.DatabaseError) -> AdvisorError:
        msg = str(e)
        if "locked" in msg or "busy" in msg:
            return AdvisorError(f"measurement store {self.path} is locked by another process (waited "
                                f"{self.timeout_s:.0f}s); wait for it to finish or use another --store")
        if "not a database" in msg or "malformed" in msg or "corrupt" in msg:
            return AdvisorError(f"measurement store {self.path} is corrupted ({msg}); move it aside (your runs can be "
                                "re-measured with `advisor sweep`) or point --store at another file")
        return AdvisorError(f"measurement store {self.path}: {msg}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all of the block's writes land, or none do."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise self._explain(e) from e
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise self._explain(e) from e

    def close(self) -> None:
        self._conn.close()

    # -- writes -------------------------------------------------------------------------------------
    def add_model(self, fingerprint: str, name: str, family: str | None = None, source_kind: str | None = None,
                  n_params: int | None = None, non_embedding_params: int | None = None,
                  info: dict[str, Any] | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO models VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(fingerprint) DO UPDATE SET "
                "name=excluded.name, family=excluded.family, n_params=excluded.n_params, "
                "non_embedding_params=excluded.non_embedding_params, info=excluded.info",
                (fingerprint, name, family, source_kind, n_params, non_embedding_params,
                 json.dumps(info or {}, default=str), time.time()))

    def add_baseline(self, model_fp: str, protocol: dict[str, Any], ppl: float, nll: float, n_tokens: int,
                     seconds: float | None = None) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO baselines VALUES (?,?,?,?,?,?,?,?)",
                      (model_fp, stable_hash(protocol_key(protocol)), json.dumps(protocol, default=str), ppl, nll,
                       n_tokens, seconds, time.time()))

    def add_probe(self, model_fp: str, settings: dict[str, Any], features: dict[str, float],
                  provenance: dict[str, Any], seconds: float | None = None) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO probes VALUES (?,?,?,?,?,?)",
                      (model_fp, stable_hash(settings), json.dumps(features), json.dumps(provenance, default=str),
                       seconds, time.time()))

    def add_run(self, **row: Any) -> bool:
        """Insert one complete run; returns False if the same (model, spec, calibration, protocol, seed) exists.

        Required keys: model_fp, model_name, spec, calibration (dict), protocol (dict), status.
        """
        row = dict(row)
        row.setdefault("seed", 0)
        row["calib_hash"] = stable_hash(protocol_key(row.get("calibration") or {}))
        row["protocol_hash"] = stable_hash(protocol_key(row.get("protocol") or {}))
        if row.get("dl") is None and row.get("nll") is not None and row.get("baseline_nll") is not None:
            row["dl"] = row["nll"] - row["baseline_nll"]
        kld = row.get("kld") or {}
        if row.get("kld_mean") is None and kld.get("mean") is not None:
            row["kld_mean"] = kld["mean"]
        for key in ("calibration", "protocol", "versions", "extra", "kld"):
            row[key] = json.dumps(_finite_tree(row.get(key) or {}), default=str)
        unknown = set(row) - set(RUN_COLUMNS)
        if unknown:
            raise ValueError(f"unknown run fields {sorted(unknown)}; known: {', '.join(RUN_COLUMNS)}")
        values = [_finite_or_none(row.get(k)) for k in RUN_COLUMNS]
        with self.transaction() as c:
            cur = c.execute(f"INSERT OR IGNORE INTO runs ({', '.join(RUN_COLUMNS)}, created_at) "
                            f"VALUES ({', '.join('?' * len(RUN_COLUMNS))}, ?)", (*values, time.time()))
            return cur.rowcount == 1

    # -- reads --------------------------------------------------------------------------------------
    def has_run(self, model_fp: str, spec: str, calibration: dict[str, Any], protocol: dict[str, Any],
                seed: int = 0, include_failed: bool = True) -> bool:
        q = ("SELECT status FROM runs WHERE model_fp=? AND spec=? AND calib_hash=? AND protocol_hash=? AND seed=?")
        row = self._conn.execute(q, (model_fp, spec, stable_hash(protocol_key(calibration)),
                                     stable_hash(protocol_key(protocol)), seed)).fetchone()
        return row is not None and (include_failed or row["status"] == "ok")

    def baseline(self, model_fp: str, protocol: dict[str, Any]) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT * FROM baselines WHERE model_fp=? AND protocol_hash=?",
                                 (model_fp, stable_hash(protocol_key(protocol)))).fetchone()
        return dict(row) if row else None

    def probe(self, model_fp: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT * FROM probes WHERE model_fp=? AND settings_hash=?",
                                 (model_fp, stable_hash(settings))).fetchone()
        if not row:
            return None
        out = dict(row)
        out["features"] = json.loads(out["features"])
        out["provenance"] = json.loads(out["provenance"])
        return out

    def runs(self, status: str | None = "ok"):
        """All runs as a pandas DataFrame (joined with model family and parameter counts)."""
        import pandas as pd

        q = ("SELECT r.*, m.family, m.n_params, m.non_embedding_params FROM runs r "
             "LEFT JOIN models m ON m.fingerprint = r.model_fp")
        params: tuple = ()
        if status:
            q += " WHERE r.status = ?"
            params = (status,)
        return pd.read_sql_query(q + " ORDER BY r.id", self._conn, params=params)

    def count_runs(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def export(self, path: str | Path) -> Path:
        """Write all runs to CSV or parquet (by suffix), atomically."""
        from advisor.models.saving import atomic_write_table

        return atomic_write_table(path, self.runs(status=None))


def default_store_path() -> Path:
    from advisor.models.paths import advisor_home

    return advisor_home() / "measurements.sqlite"


def open_store(path: str | Path | None = None) -> Store:
    return Store(Path(path) if path else default_store_path())
