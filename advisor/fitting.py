"""Fitting data and the fitted predictor: from the store to a table, from the table to a predictor.

The shipped fitting data (``advisor/data/runs.csv``, documented column by column in
``advisor/data/runs_columns.md``) is the project's own sweep of its model zoo and SmolLM2-135M. The
default predictor (``advisor/data/predictor.json``) is fitted on it; ``advisor fit`` refits on the
user's runs, optionally together with the shipped ones.

Held-out groups: a zoo model's group is its family (llama, gpt2, opt); any other model is its own
group (so SmolLM2-135M, pre-quantized at the source, is a transfer test, never in the zoo fit).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from advisor.features import spec_row
from advisor.predictor import Predictor, PredictorError, check_runs, error_report, fit_forest, forest_matrix, leave_one_group_out

DATA = Path(__file__).with_name("data")
SHIPPED_RUNS = DATA / "runs.csv"
SHIPPED_PREDICTOR = DATA / "predictor.json"
TRANSFER_MODELS = ("smollm2-135m",)


def group_of(model_name: str, family: str | None) -> str:
    return family if model_name.startswith("zoo:") and family else model_name


def runs_table(store) -> pd.DataFrame:
    """Every ok run in ``store`` joined with its model's probe features, as predictor rows.

    A run takes the probes made on its own calibration text (a model swept on two corpora in one
    store has a probe bundle per corpus); runs whose model has no probes on that text are left out.
    """
    runs = store.runs(status="ok")
    rows: list[dict[str, Any]] = []
    if runs.empty:
        return pd.DataFrame(rows)
    runs = runs.assign(_calib_text=[_text_of(c) for c in runs["calibration"]])
    for (fp, name, text), part in runs.groupby(["model_fp", "model_name", "_calib_text"], sort=False, dropna=False):
        probe = stored_features(store, fp, calib_text=None if pd.isna(text) else text)
        if probe is None:
            continue
        family = part["family"].iloc[0]
        for _, r in part.iterrows():
            row = spec_row(probe, r["spec"], int(r["non_embedding_params"]), float(r["baseline_nll"]))
            row.update(model=name, model_fp=fp, family=family, group=group_of(name, family), dl=float(r["dl"]),
                       ppl=float(r["ppl"]), baseline_ppl=float(r["baseline_ppl"]),
                       bits_per_weight=float(r["bits_per_weight"]), n_params=int(r["n_params"]),
                       non_embedding_params=int(r["non_embedding_params"]), packed=int(r["packed"] or 0),
                       protocol_hash=r["protocol_hash"], calib_hash=r["calib_hash"], seconds=float(r["seconds"]),
                       eval_data=protocol_label(r["protocol"]), prequantized_source=int(name in TRANSFER_MODELS))
            rows.append(row)
    return pd.DataFrame(rows)


def _as_dict(value: Any) -> dict[str, Any]:
    """A protocol record as stored (a dict, or its JSON text); {} when unreadable."""
    if isinstance(value, dict):
        return value
    try:
        out = json.loads(value or "{}")
    except (TypeError, json.JSONDecodeError):
        return {}
    return out if isinstance(out, dict) else {}


def _text_of(calibration: Any) -> str | None:
    """The identity of a calibration text (sha256 of the corpus) in a run's or probe's protocol record."""
    return _as_dict(calibration).get("text_sha256")


def protocol_label(protocol: Any) -> str:
    """A readable name of an evaluation protocol's text: ``stdlib-code:eval``, ``wiki.test.raw``."""
    p = _as_dict(protocol)
    if p.get("dataset") in (None, "", "file"):
        return str(p.get("source") or "unknown")
    return f"{p['dataset']}:{p['split']}" if p.get("split") else str(p["dataset"])


def stored_features(store, fp: str, calib_text: str | None = None) -> dict[str, float] | None:
    """The model's probe features: every cached bundle merged (``advisor.probing``), the newest value of
    each feature winning.

    ``calib_text``: only the bundles probed on that calibration text (the ``text_sha256`` their provenance
    records); bundles that record no text are used only when none does.
    """
    rows = store._conn.execute("SELECT features, provenance FROM probes WHERE model_fp=? ORDER BY created_at",
                               (fp,)).fetchall()
    # `advisor probe` records hold the caller's settings, not the predictor's (advisor.probing)
    rows = [row for row in rows if _as_dict(row["provenance"]).get("predictor", True) is not False]
    if calib_text is not None:
        texts = [_text_of(_as_dict(row["provenance"]).get("calibration")) for row in rows]
        if any(texts):
            rows = [row for row, t in zip(rows, texts) if t == calib_text]
    if not rows:
        return None
    out: dict[str, float] = {}
    for row in rows:
        out.update(json.loads(row["features"]))
    return out


def export_runs_table(store, path: str | Path) -> tuple[Path, int, int]:
    """Write ``runs_table(store)`` (what ``advisor fit --runs`` reads) to CSV or parquet (by suffix), atomically.

    Returns (path, rows written, ok runs left out because their model has no stored probes).
    """
    from advisor.models.saving import atomic_write_table

    df = runs_table(store)
    left_out = int(len(store.runs(status="ok")) - len(df))
    return atomic_write_table(path, df), int(len(df)), left_out


def read_runs(path: str | Path) -> pd.DataFrame:
    """A runs file (CSV or parquet) with predictor columns; refused (with row numbers) if columns are
    missing or NaN, and with what to do instead if it is a raw store export (no probe features)."""
    path = Path(path)
    if not path.is_file():
        raise PredictorError(f"runs file {path} not found; make one with `advisor sweep --export RUNS.csv`")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, low_memory=False)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise PredictorError(f"runs file {path} is not a readable CSV/parquet table ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'empty'}); make one with "
                             "`advisor sweep --export RUNS.csv`") from None
    if "model_name" in df.columns and "log_so" not in df.columns:
        raise PredictorError(f"runs file {path} is a raw store export (runs without their models' probe features); "
                             "write the fitting table with `advisor sweep --models ... --store STORE --export RUNS.csv` "
                             "(it measures nothing already in the store), or fit straight from the store with "
                             "`advisor fit --store STORE`")
    if "group" not in df.columns:
        if "model" not in df.columns:
            raise PredictorError(f"runs file {path} has neither a 'group' nor a 'model' column")
        df["group"] = [group_of(m, f) for m, f in zip(df["model"], df.get("family", [None] * len(df)))]
    try:
        check_runs(df)
    except PredictorError as e:
        raise PredictorError(f"runs file {path}: {e}") from None
    unknown_specs = []
    from advisor.quantizers import QuantSpec

    for i, s in enumerate(df.get("spec", [])):
        try:
            QuantSpec.parse(str(s))
        except ValueError:
            unknown_specs.append(i)
    if unknown_specs:
        raise PredictorError(f"runs file {path}: unknown or invalid spec in rows {unknown_specs[:20]}")
    return df


def shipped_runs() -> pd.DataFrame:
    if not SHIPPED_RUNS.exists():
        raise PredictorError("this installation has no shipped fitting data (advisor/data/runs.csv); "
                             "run `advisor sweep` and `advisor fit --runs RUNS.csv --out PRED.json`")
    return read_runs(SHIPPED_RUNS)


def fit(df: pd.DataFrame, exclude_transfer: bool = True, make=None) -> Predictor:
    """Fit and conformally calibrate on ``df`` (transfer models left out unless asked). ``make`` builds the
    unfitted estimator (default ``Predictor``; benchmarks pass their variants)."""
    train = df[df["prequantized_source"].fillna(0).astype(int) == 0] if exclude_transfer and "prequantized_source" in df else df
    if len(train) < 10:
        raise PredictorError(f"only {len(train)} runs to fit on; need at least 10")
    predictor = (make or Predictor)().fit(train)
    groups = sorted(map(str, train["group"].unique()))
    if len(groups) < 2:  # split-conformal holds out whole groups: with one, the intervals would be uncalibrated
        raise PredictorError(f"the runs to fit on are all of one group ({groups[0]}): their intervals cannot be "
                             "calibrated on held-out groups; add runs of another model family, or fit together "
                             "with the shipped runs (`advisor fit --with-shipped`)")
    return predictor.calibrate(train, train["group"].to_numpy())


def load_default_predictor() -> Predictor:
    """The shipped predictor (JSON), or one refit from the shipped runs when no JSON is shipped."""
    if SHIPPED_PREDICTOR.exists():
        p = Predictor.load(SHIPPED_PREDICTOR)
        p.source_ = f"the shipped {SHIPPED_PREDICTOR.name}"
    else:
        p = fit(shipped_runs())
        p.source_ = "refit from the shipped runs"
    return p


def report(df: pd.DataFrame, alpha: float = 0.1, predictor: Predictor | None = None) -> dict[str, Any]:
    """Leave-one-family-out on the zoo runs; transfer to the held-out real model(s).

    ``predictor``: ``fit(df)``, when the caller already has it (it is the one the transfer test and the
    coefficients are reported for); fitted here otherwise.
    """
    is_transfer = df["prequantized_source"].fillna(0).astype(int) == 1 if "prequantized_source" in df else \
        pd.Series(False, index=df.index)
    zoo = df[~is_transfer]
    out: dict[str, Any] = {"lofo": leave_one_group_out(zoo, "group", alpha)}
    pred = predictor if predictor is not None else fit(df)  # what `advisor fit` saves: transfer models left out
    if is_transfer.any():
        test = df[is_transfer]
        mean, lo, up = pred.predict_interval(test, alpha)
        t = error_report(test["dl"].to_numpy(), mean, lo, up, test["baseline_ppl"].to_numpy())
        forest = fit_forest(zoo).predict(forest_matrix(test))
        t["forest_median_abs_err_dl"] = float(np.median(np.abs(forest - test["dl"].to_numpy())))
        t["n_families"] = int(test["group"].nunique())
        t["models"] = sorted(test["model"].unique().tolist())
        if "eval_data" in test and test["eval_data"].nunique() > 1:  # the same model on several texts
            texts = test["eval_data"].fillna("unknown").to_numpy()
            dl, base = test["dl"].to_numpy(), test["baseline_ppl"].to_numpy()
            t["by_eval_data"] = {}
            for e in sorted(set(texts)):
                m = texts == e
                t["by_eval_data"][str(e)] = error_report(dl[m], mean[m], lo[m], up[m], base[m])
        out["transfer"] = t
    else:
        out["transfer"] = None
    out["coefficients"] = dict(zip(pred.terms(), pred.coef_.tolist()))
    out["rtn_prior"] = pred.rtn_prior_
    out["conformal"] = pred.conformal_
    return out
