"""`advisor fit` on the shipped data: refit with a new family's rows, bad runs files refused by row."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from advisor.cli import main
from advisor.fitting import SHIPPED_RUNS
from tests.conftest import PTB, WIKITEXT


def _cli(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_refit_with_a_new_family_moves_its_predictions(capsys, tmp_path):
    from advisor.predictor import Predictor

    shipped = pd.read_csv(SHIPPED_RUNS)
    one = shipped["model"].iloc[0]
    new = shipped[shipped["model"] == one].copy()
    new["model"], new["family"], new["group"] = "my-org/model-a", "newfam", "my-org/model-a"
    new["prequantized_source"] = 0
    new["dl"] = new["dl"].clip(lower=1e-4) * 4.0  # a family four times as sensitive
    runs = tmp_path / "mine.csv"
    new.to_csv(runs, index=False)
    code, out, _ = _cli(capsys, ["fit", "--runs", str(runs), "--with-shipped", "--out", str(tmp_path / "p.json"),
                                 "--json"])
    assert code == 0
    info = json.loads(out)
    assert info["n_runs"] == len(shipped) + len(new) and info["seconds"] > 0
    # SmolLM2's runs (pre-quantized at the source) are read but never fitted: the transfer test
    assert info["n_fitted"] == int((shipped["prequantized_source"] == 0).sum()) + len(new)
    before = Predictor.load(SHIPPED_RUNS.with_name("predictor.json")).predict(new)
    after = Predictor.load(tmp_path / "p.json").predict(new)
    big = new["dl"].to_numpy() > 0.01
    assert np.median(after[big] / before[big]) > 1.2  # moved towards the new family's larger dL


CONTRACT_FIELDS = {"median_abs_err_dl", "median_rel_err_dl", "coverage90", "forest_median_abs_err_dl", "spearman",
                   "n_runs", "n_families"}


def test_report_contract_on_the_shipped_data(capsys):
    """`advisor fit --report --json` on the shipped data: leave-one-family-out over the zoo's three families
    and the transfer to SmolLM2 (never fitted on), every run of it, with a breakdown per evaluation text."""
    shipped = pd.read_csv(SHIPPED_RUNS)
    code, out, _ = _cli(capsys, ["fit", "--report", "--json"])
    assert code == 0
    rep = json.loads(out)
    lofo, transfer = rep["lofo"], rep["transfer"]
    assert CONTRACT_FIELDS <= set(lofo) and CONTRACT_FIELDS <= set(transfer)
    assert lofo["n_families"] == 3 and lofo["n_runs"] == int((shipped["prequantized_source"] == 0).sum())
    assert transfer["models"] == ["smollm2-135m"] and transfer["n_runs"] == int(shipped["prequantized_source"].sum())
    for r in (lofo, transfer):
        assert 0 <= r["coverage90"] <= 1 and -1 <= r["spearman"] <= 1 and r["median_abs_err_dl"] >= 0
    texts = transfer["by_eval_data"]
    assert set(texts) == set(shipped.loc[shipped["prequantized_source"] == 1, "eval_data"]) and len(texts) >= 2
    assert sum(t["n_runs"] for t in texts.values()) == transfer["n_runs"]


@pytest.mark.parametrize("damage,message", [
    (lambda df: df.drop(columns=["log_so"]), "missing columns ['log_so']"),
    (lambda df: df.assign(dl=[np.nan] + list(df["dl"].iloc[1:])), "column 'dl' is NaN/non-numeric in rows [0]"),
    (lambda df: df.assign(spec=list(df["spec"].iloc[:2]) + ["gptq:int5:g128"] + list(df["spec"].iloc[3:])),
     "unknown or invalid spec in rows [2]"),
])
def test_bad_runs_file_is_refused_with_rows(capsys, tmp_path, damage, message):
    df = damage(pd.read_csv(SHIPPED_RUNS).head(30))
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    code, _, err = _cli(capsys, ["fit", "--runs", str(path)])
    assert code != 0 and message in err, err


@pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")
def test_sweep_export_feeds_fit_and_a_raw_export_is_refused_with_what_to_do(capsys, tmp_path, tiny_folder):
    """The documented refit workflow end to end on a real (tiny) model: `advisor sweep --export` writes the
    fitting table (runs joined with their model's probe features), which `advisor fit --runs` reads; the
    store's raw export (`--export-raw`, no features) is refused with the command that makes the table."""
    store, table, raw = tmp_path / "m.sqlite", tmp_path / "mine.csv", tmp_path / "raw.csv"
    specs = ["rtn:int8", "rtn:int4:g128", "gptq:int4:g128"]
    code, out, _ = _cli(capsys, ["sweep", "--models", str(tiny_folder), "--specs", *specs, "--eval", f"file:{PTB}",
                                 "--calib", f"file:{PTB}", "--seq-len", "32", "--max-windows", "3", "--n-calib", "2",
                                 "--calib-seq-len", "32", "--store", str(store), "--export", str(table),
                                 "--export-raw", str(raw), "--json"])
    assert code == 0
    info = json.loads(out)
    assert info["done"] == 3 and info["exported_rows"] == 3 and info["exported_left_out"] == 0
    rows = pd.read_csv(table)
    assert sorted(rows["spec"]) == sorted(specs) and rows["rtn_dl"].notna().all() and rows["log_so"].notna().all()
    code, out, _ = _cli(capsys, ["fit", "--runs", str(table), "--with-shipped", "--out", str(tmp_path / "p.json"),
                                 "--json"])
    assert code == 0 and json.loads(out)["n_runs"] == len(pd.read_csv(SHIPPED_RUNS)) + 3
    code, _, err = _cli(capsys, ["fit", "--runs", str(raw), "--out", str(tmp_path / "q.json")])
    assert code != 0 and "raw store export" in err and "--export RUNS.csv" in err
    assert not (tmp_path / "q.json").exists()


@pytest.mark.skipif(not (PTB.exists() and WIKITEXT.exists()), reason="needs ../shared")
def test_runs_on_two_calibration_texts_keep_their_own_probes(capsys, tmp_path, tiny_folder):
    """A model swept on two corpora in one store has a probe bundle per calibration text: each run is joined
    with the probes of its own text (not the newest bundle), and the table names each run's evaluation text."""
    store, first, both = tmp_path / "m.sqlite", tmp_path / "first.csv", tmp_path / "both.csv"
    common = ["--models", str(tiny_folder), "--specs", "rtn:int4:g128", "--seq-len", "32", "--max-windows", "3",
              "--n-calib", "2", "--calib-seq-len", "32", "--store", str(store), "--json"]
    assert _cli(capsys, ["sweep", *common, "--eval", f"file:{PTB}", "--calib", f"file:{PTB}",
                         "--export", str(first)])[0] == 0
    assert _cli(capsys, ["sweep", *common, "--eval", f"file:{WIKITEXT}", "--calib", f"file:{WIKITEXT}",
                         "--export", str(both)])[0] == 0
    before, after = pd.read_csv(first), pd.read_csv(both).set_index("eval_data")
    assert len(after) == 2 and set(after.index) == {"ptb.valid.txt", "wiki.test.raw"}
    for col in ("rtn_dl", "log_so", "sqnr_db"):
        assert after.loc["ptb.valid.txt", col] == pytest.approx(before[col].iloc[0], rel=1e-12)
    assert after.loc["wiki.test.raw", "rtn_dl"] != pytest.approx(after.loc["ptb.valid.txt", "rtn_dl"], rel=1e-6)


@pytest.mark.parametrize("which,message", [("family", "all of one group (llama)"),
                                           ("model", "not separable on these runs")])
def test_runs_of_one_family_or_one_model_are_refused_and_nothing_is_saved(capsys, tmp_path, which, message):
    """One family cannot calibrate its intervals (they hold out whole families); one model cannot separate
    its scale terms from the intercept. Either is refused with one error line, no warnings, no file."""
    import warnings

    df = pd.read_csv(SHIPPED_RUNS)
    df = df[df["group"] == "llama"]
    if which == "model":
        df = df[df["model"] == df["model"].iloc[0]]
    path, out = tmp_path / "one.csv", tmp_path / "p.json"
    df.to_csv(path, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, stdout, err = _cli(capsys, ["fit", "--runs", str(path), "--out", str(out)])
    assert code == 1 and message in err and "--with-shipped" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and stdout == ""
