"""`advisor probe` over a saved tiny model: the JSON contract, the cache, clear errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from advisor.cli import main

FAST = ["--set", 'sqnr.dtypes=["int4", "mxfp4"]', "--set", 'second_order.dtypes=["int4", "int8"]',
        "--set", "hessian.power_iters=1", "--set", "perturbation.sigmas=[0.01, 0.1]",
        "--set", "outliers.extra_chars=5000", "--set", 'rtn_loss.keys=["int4_g128"]',
        "--n-calib", "2", "--calib-seq-len", "16"]
PREFIXES = ("hessian.", "fisher.", "perturbation.", "outliers.", "sqnr.", "second_order.", "rtn_loss.")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    """A small calibration text (the default stdlib-code:calib takes seconds to tokenize per run)."""
    from advisor.models.data import stdlib_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(stdlib_text("calib")[:20000])
    return f"file:{path}"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_probe_json_contract_and_cache(capsys, tiny_folder, calib_file):
    FAST = [*globals()["FAST"], "--calib", calib_file]
    code, out, err = run_cli(capsys, "probe", "--model", str(tiny_folder), "--json", *FAST)
    assert code == 0, err
    d = json.loads(out)
    assert {"features", "per_layer", "provenance", "seconds"} <= set(d)
    assert d["cached"] is False
    feats = d["features"]
    for p in PREFIXES:
        assert any(k.startswith(p) for k in feats), p
    assert all(isinstance(v, float) and math.isfinite(v) for v in feats.values())
    prov = d["provenance"]
    assert prov["calibration"]["n_windows"] == 2 and prov["calibration"]["seq_len"] == 16
    assert prov["model"]["fingerprint"] and prov["seed"] == 0
    assert set(prov["probes"]) == {p[:-1] for p in PREFIXES}
    assert prov["probes"]["sqnr"]["settings"]["dtypes"] == ["int4", "mxfp4"]
    assert d["per_layer"]["fisher"] and "layer" in d["per_layer"]["fisher"][0]

    code, out2, _ = run_cli(capsys, "probe", "--model", str(tiny_folder), "--json", *FAST)
    again = json.loads(out2)
    assert code == 0 and again["cached"] is True and again["features"] == feats

    code, out3, _ = run_cli(capsys, "probe", "--model", str(tiny_folder), "--json", "--no-cache", *FAST)
    fresh = json.loads(out3)
    assert fresh["cached"] is False and fresh["features"] == feats  # deterministic

    # a different seed is a different cache entry
    code, out4, _ = run_cli(capsys, "probe", "--model", str(tiny_folder), "--json", "--seed", "1",
                            "--probes", "hessian", *FAST)
    other = json.loads(out4)
    assert other["cached"] is False and set(k.split(".")[0] for k in other["features"]) == {"hessian"}


def test_probe_text_output(capsys, tiny_folder, calib_file):
    code, out, _ = run_cli(capsys, "probe", "--model", str(tiny_folder), "--probes", "sqnr", *FAST, "--calib", calib_file)
    assert code == 0 and "sqnr.int4_pc_db" in out


@pytest.mark.parametrize("argv, message", [
    (["--probes", "hesian"], "unknown probe 'hesian'"),
    (["--set", "fisher.n_window=2"], "unknown setting of probe 'fisher'"),
    (["--set", "fisher"], "expected PROBE.KEY=VALUE"),
    (["--calib", "nosuchcorpus"], "unknown dataset"),
])
def test_probe_errors_are_clear(capsys, tiny_folder, argv, message):
    code, out, err = run_cli(capsys, "probe", "--model", str(tiny_folder), *argv)
    assert code != 0 and message in err and "Traceback" not in err


def test_cli_defaults_match_library():
    from advisor import probes
    from advisor.commands import probe

    assert (probe.DEFAULT_CALIB, probe.DEFAULT_N_CALIB, probe.DEFAULT_CALIB_SEQ_LEN) == (
        probes.DEFAULT_CALIB, probes.DEFAULT_N_CALIB, probes.DEFAULT_CALIB_SEQ_LEN)


def test_probe_cache_is_the_store_and_stays_out_of_the_fit(capsys, tiny_folder, calib_file, tmp_path):
    """`advisor probe` caches in the SQLite measurement store (--store), one record per run with its
    per-layer tables; the fit's feature join ignores it (its settings are the caller's)."""
    from advisor.fitting import stored_features
    from advisor.store import open_store

    db = tmp_path / "store.sqlite"
    argv = ["probe", "--model", str(tiny_folder), "--json", "--probes", "sqnr", "--store", str(db), *FAST,
            "--calib", calib_file]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    first = json.loads(out)
    store = open_store(db)
    rows = store._conn.execute("SELECT model_fp, provenance FROM probes").fetchall()
    assert len(rows) == 1 and json.loads(rows[0]["provenance"])["record"]["per_layer"]["sqnr"]
    assert stored_features(store, rows[0]["model_fp"]) is None
    code, out, _ = run_cli(capsys, *argv)
    again = json.loads(out)
    assert again["cached"] is True and again["features"] == first["features"]
    assert again["per_layer"] == first["per_layer"]


# --- advisor.probing: what a request needs, one record per probe and key, the cost said first ---------
def _tiny_loaded():
    from advisor.models.adapters import get_adapter
    from advisor.models.loading import LoadedModel, ModelSource
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    return LoadedModel(model, None, get_adapter(model), ModelSource("tiny", "test", "tiny", "t" * 16))


def _windows(n, seq, seed):
    from advisor.models.data import Windows
    from tests.conftest import VOCAB

    ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, {"dataset": "random-tokens", "seed": seed, "text_sha256": f"t{seed}"})


def test_probe_features_measure_only_what_the_candidates_need(tmp_path, capsys):
    from advisor.fitting import stored_features
    from advisor.probes import run_probes
    from advisor.probing import base_settings, probe_features, probe_keys
    from advisor.store import open_store

    loaded, store = _tiny_loaded(), open_store(tmp_path / "s.sqlite")
    store.add_model(loaded.source.fingerprint, "tiny")
    calib, loss = _windows(4, 16, 0), _windows(8, 32, 1)
    assert probe_keys(["gptq:int4:g128", "rtn:int4:g128", "awq:int8"]) == ["int4_g128", "int8_pc"]
    f1, p1 = probe_features(loaded, calib, store, loss_windows=loss, keys=["int4_g128"], progress=True)
    err = capsys.readouterr().err
    assert "probes: about" in err and "ETA" in err and "probe rtn_loss done" in err
    assert {k.split(".")[0] for k in f1} == {"fisher", "perturbation", "sqnr", "second_order", "rtn_loss"}
    assert {"second_order.int4_g128", "sqnr.int4_g128_db", "perturbation.all_knee_sigma", "rtn_loss.int4_g128",
            "rtn_loss.int4_g128_se"} <= set(f1)
    assert not any("int8" in k for k in f1) and not any(k.startswith("perturbation.attn_") for k in f1)
    assert p1["cached"] is False and p1["probes"]["rtn_loss"]["run"] == ["int4_g128"]
    assert p1["probes"]["rtn_loss"]["precision"]["int4_g128"]["n_windows"] >= 2
    assert set(p1["estimate"]["seconds"]) == {"fisher", "perturbation", "sqnr", "second_order", "rtn_loss"}

    # a second format: only it is measured (fisher again, for second_order's diagonal); the first is reused
    f2, p2 = probe_features(loaded, calib, store, loss_windows=loss, keys=["int4_g128", "int8_pc"])
    assert p2["probes"]["rtn_loss"] == {**p2["probes"]["rtn_loss"], "run": ["int8_pc"], "cached": ["int4_g128"]}
    assert p2["probes"]["sqnr"]["run"] == ["int8_pc"] and "perturbation" not in {
        p for p, v in p2["probes"].items() if v.get("run")}
    assert {k: f2[k] for k in f1} == f1
    f3, p3 = probe_features(loaded, calib, store, loss_windows=loss, keys=["int8_pc", "int4_g128"])
    assert p3["cached"] is True and f3 == f2

    # per-key records hold the values of one run over every key
    both = run_probes(loaded, calib, names=["fisher", "sqnr", "second_order"],
                      settings={"sqnr": {**base_settings("sqnr"), "keys": ["int4_g128", "int8_pc"]},
                                "second_order": {**base_settings("second_order"), "keys": ["int4_g128", "int8_pc"]}})
    for k in ("sqnr.int8_pc_db", "second_order.int8_pc", "second_order.int4_g128", "fisher.trace"):
        assert f2[k] == pytest.approx(both.features[k], rel=1e-6), k
    # the fit reads them back merged, by calibration text
    assert set(f2) <= set(stored_features(store, loaded.source.fingerprint))


def test_a_sweep_probes_every_landscape_probe_and_format():
    from advisor.features import LANDSCAPE_PROBES, RTN_LOSS_KEYS
    from advisor.probes._rtn import configs
    from advisor.probing import units_for

    units = units_for(list(RTN_LOSS_KEYS), full=True)
    assert {u.probe for u in units} == set(LANDSCAPE_PROBES) | {"rtn_loss"}
    assert {u.key for u in units if u.probe == "sqnr"} == {k for _, _, k in configs(None, all_group_sizes=True)}
    assert {u.key for u in units if u.probe == "perturbation"} == {"all", "attn", "mlp"}
    assert [u.key for u in units if u.probe == "rtn_loss"] == list(RTN_LOSS_KEYS)
    assert all(u.on_loss_windows == (u.probe == "rtn_loss") for u in units)
    few = units_for(["int4_g128"])
    assert {(u.probe, u.key) for u in few} == {("fisher", None), ("perturbation", "all"), ("sqnr", "int4_g128"),
                                               ("second_order", "int4_g128"), ("rtn_loss", "int4_g128")}
