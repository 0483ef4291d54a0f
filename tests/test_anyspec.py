"""Any spec a user asks for is predicted from a measured RTN loss (measured on demand, cached), and
predictions respect the orderings that hold for RTN (advisor.orderings), on a tiny real model."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from advisor.store import Store
from tests.conftest import PTB, ROOT

pytestmark = pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")


@pytest.fixture(scope="module")
def common(tmp_path_factory, tiny_folder, one_thread):
    store = Store(tmp_path_factory.mktemp("anyspec") / "m.sqlite")
    return dict(calib=f"file:{PTB}", eval=f"file:{PTB}", seq_len=32, max_windows=4, n_calib=2, store=store,
                progress=False)


def rtn_loss_rows(store: Store, fp: str) -> dict[str, int]:
    """How many stored rtn_loss records each format key has."""
    out: dict[str, int] = {}
    for (prov,) in store._conn.execute("SELECT provenance FROM probes WHERE model_fp=?", (fp,)):
        p = json.loads(prov)
        if p.get("probe") == "rtn_loss":
            out[p["key"]] = out.get(p["key"], 0) + 1
    return out


def assert_ordered(df: pd.DataFrame) -> int:
    """Every pair ordered by advisor.orderings respects it on the centre and both bounds; returns the pairs."""
    from advisor.orderings import order_matrix

    M = order_matrix(list(df["spec"]))
    for col in ("pred_dl", "pred_dl_lower", "pred_dl_upper"):
        v = df[col].to_numpy(float)
        bad = [(df["spec"][i], df["spec"][j]) for i, j in zip(*np.nonzero(M)) if v[i] > v[j]]
        assert not bad, (col, bad[:5])
    return int(M.sum())


# -- the order and the projection ------------------------------------------------------------------
def test_format_keys_cover_every_group_size_and_symmetry():
    from advisor.candidates import all_format_specs
    from advisor.models.errors import AdvisorError
    from advisor.probes import feature_key
    from advisor.probes._rtn import format_table, is_symmetric_key, parse_key
    from advisor.quantizers import QuantSpec

    for s in all_format_specs() + ["rtn:int3:g96", "rtn:nf4:g8", "rtn:fp6_e3m2:g1000"]:
        q = QuantSpec.parse(s)
        key = feature_key(q)
        dtype, group, symmetric = parse_key(key)
        assert (dtype, symmetric, is_symmetric_key(key)) == (q.dtype, q.symmetric, q.symmetric)
        assert group == q.group_size and format_table([key]) == [(dtype, group, key)]
    assert feature_key("gptq:int4:g128:asym") == "int4_g128_asym" and feature_key("rtn:int4:g128") == "int4_g128"
    for bad in ("int5_g128", "fp6_e3m2_g128_asym", "mxfp4_g32", "int4_g0128", "int4"):
        with pytest.raises(AdvisorError, match="unknown format key"):
            parse_key(bad)


def test_the_order_on_data_types_and_groups():
    from advisor.orderings import dtype_finer_or_equal as finer, finer_or_equal

    assert finer("int4", "int3") and finer("int8", "int2") and not finer("int3", "int4")
    assert finer("nf4", "nf3") and finer("mxint8", "mxint4") and finer("mxfp6_e3m2", "mxfp4")
    assert finer("fp8_e4m3", "fp6_e3m2") and finer("fp8_e5m2", "fp6_e3m2") and finer("fp6_e2m3", "fp4_e2m1")
    # not ordered: fewer mantissa bits (e5m2 vs e2m3), a grid that stops lower in its top binade (MX
    # e4m3 saturates above 448 of 512, e2m3 above 7.5 of 8), other families
    assert not finer("fp8_e5m2", "fp6_e2m3") and not finer("mxfp8_e4m3", "mxfp6_e2m3")
    assert not finer("int4", "nf4") and not finer("nf4", "int4") and not finer("mxint8", "mxfp4")
    assert finer_or_equal("rtn:int4:g64", "rtn:int4:g128") and finer_or_equal("rtn:int4:g256", "rtn:int4")
    assert finer_or_equal("rtn:int8:g32", "rtn:int3:g128") and not finer_or_equal("rtn:int8", "rtn:int3:g128")
    assert not finer_or_equal("gptq:int4:g64", "rtn:int4:g128")  # another method
    assert not finer_or_equal("rtn:int4:g64:asym", "rtn:int4:g128")  # another symmetry
    assert not finer_or_equal("rtn:mxint8", "rtn:int4")  # MX blocks are not ordered against groups


def test_the_order_holds_on_every_measured_rtn_loss_of_smollm2():
    """The shipped runs' measured RTN losses (rtn_loss probe and the quantized model's dL) of SmolLM2-135M on
    six texts: no ordered pair is inverted beyond two standard errors."""
    from advisor.orderings import order_matrix

    d = pd.read_csv(ROOT / "advisor" / "data" / "runs.csv")
    d = d[(d["method"] == "rtn") & (d["prequantized_source"] == 1)]
    pairs = 0
    for _, g in d.groupby("protocol_hash"):
        g = g.drop_duplicates("spec").reset_index(drop=True)
        M = order_matrix(list(g["spec"]))
        for i, j in zip(*np.nonzero(M)):
            pairs += 1
            se = np.hypot(g["rtn_dl_se"][i], g["rtn_dl_se"][j])
            assert g["rtn_dl"][i] <= g["rtn_dl"][j] + 2 * se, (g["spec"][i], g["spec"][j])
    assert pairs >= 50


def test_isotonic_projection_agrees_with_its_references():
    from sklearn.isotonic import IsotonicRegression

    from advisor.candidates import all_format_specs
    from advisor.orderings import isotonic, isotonic_reference, order_matrix

    rng = np.random.default_rng(0)
    specs = [s for s in all_format_specs() if s.startswith(("rtn:int", "rtn:fp")) and ":asym" not in s]
    M = order_matrix(specs)
    assert M.sum() > 100
    for _ in range(3):
        y, w = rng.normal(size=len(specs)), rng.uniform(0.1, 10, len(specs))
        x = isotonic(y, w, M)
        assert all(x[i] <= x[j] for i, j in zip(*np.nonzero(M)))
        ref = isotonic_reference(y, w, M)
        assert np.sum(w * (x - y) ** 2) <= np.sum(w * (ref - y) ** 2) * (1 + 1e-9)
        np.testing.assert_allclose(x, ref, atol=1e-5)  # SLSQP stops at about 1e-6
    # a chain: the classic pool-adjacent-violators answer (finest first, so x must increase)
    chain = ["rtn:int4:g16", "rtn:int4:g32", "rtn:int4:g64", "rtn:int4:g128", "rtn:int4:g256", "rtn:int4"]
    y, w = rng.normal(size=6), rng.uniform(0.1, 10, 6)
    expected = IsotonicRegression().fit(np.arange(6), y, sample_weight=w).predict(np.arange(6))
    np.testing.assert_allclose(isotonic(y, w, order_matrix(chain)), expected, atol=1e-10)
    ordered = np.sort(y)
    assert np.array_equal(isotonic(ordered, w, order_matrix(chain)), ordered)  # nothing to do: unchanged


def test_an_estimate_yields_to_measured_neighbours_and_covers_them():
    """The issue's case: a 6-bit format at g128 estimated at 4.86 nats while the same format per channel
    was measured at 0.067: the estimate is capped by the coarser measurement and its interval reaches down
    to the finer measured format's lower bound; measured rows are not moved."""
    from advisor.orderings import consistent

    specs = ["rtn:fp6_e3m2", "rtn:fp6_e3m2:g128", "rtn:fp4_e2m1:g128", "rtn:fp8_e4m3:g128"]
    mean, lo, up = [0.067, 4.86, 0.27, 0.01], [0.04, 3.3, 0.18, 0.005], [0.10, 6.99, 0.39, 0.02]
    m, l, u = consistent(specs, mean, lo, up, [1e-4, 0.8, 1e-3, 1e-5], [False, True, False, False])
    np.testing.assert_allclose(m[[0, 2, 3]], [0.067, 0.27, 0.01])
    np.testing.assert_allclose(l[[0, 2, 3]], [0.04, 0.18, 0.005])
    np.testing.assert_allclose(u[[0, 2, 3]], [0.10, 0.39, 0.02])
    assert m[3] <= m[1] <= m[0] and l[1] == pytest.approx(0.005) and u[1] == pytest.approx(0.10)
    # no measured neighbour at all: the interval reaches 0 (the float model's loss), the estimate stands
    m, l, u = consistent(specs[1:2], mean[1:2], lo[1:2], up[1:2], [0.8], [True])
    assert (m[0], l[0], u[0]) == (4.86, 3.3, 6.99)  # a single spec is not ordered against anything
    m, l, u = consistent(specs[1:3], [4.86, 0.27], [3.3, 0.18], [6.99, 0.39], [0.8, 1e-3], [True, True])
    assert l[0] <= 0 and u[0] >= 6.99 and u[1] >= u[0] and l[0] <= l[1]


# -- on a tiny real model ------------------------------------------------------------------------
def test_every_format_and_group_size_is_measured_and_predicted_in_order(tiny_folder, common, tmp_path):
    """Every data type x group size the kernels run (per channel, g16-g256, MX blocks; ints also asymmetric)
    gets a measured RTN loss and a prediction; every ordered pair holds on centre and bounds."""
    from advisor.api import plan
    from advisor.candidates import all_format_specs
    from advisor.fitting import load_default_predictor

    common = dict(common, store=Store(tmp_path / "fresh.sqlite"))  # nothing measured yet
    specs = all_format_specs("rtn")
    df = plan(str(tiny_folder), specs=specs, predictor=load_default_predictor(), **common)
    assert sorted(df["spec"]) == sorted(specs) and df.attrs["requested"] == specs
    assert df["rtn_dl"].notna().all() and not df["estimated_physics"].any()
    assert df["rtn_loss_on_demand"].all()
    assert assert_ordered(df) > 300
    gptq = plan(str(tiny_folder), specs=all_format_specs("gptq"), predictor=load_default_predictor(), **common)
    assert assert_ordered(gptq) > 100 and not gptq["rtn_loss_on_demand"].any()  # the same formats: stored


def test_on_demand_measurement_is_stored_once_and_reused(tiny_folder, common, capsys):
    from advisor.api import predict_candidates, prepare
    from advisor.cli import main

    ctx = prepare(str(tiny_folder), specs=["rtn:int8"], **common)
    fp = ctx.loaded.source.fingerprint
    before = rtn_loss_rows(common["store"], fp)
    assert "int3_g96_asym" not in before
    measured_by_prepare = list(ctx.rtn_loss_on_demand)  # int8_pc, unless an earlier test stored it
    df = predict_candidates(ctx, ["rtn:int3:g96:asym", "gptq:int3:g96:asym"]).set_index("spec")
    assert df["rtn_loss_on_demand"].all()
    assert df.attrs["rtn_loss_on_demand"] == measured_by_prepare + ["int3_g96_asym"]
    after = rtn_loss_rows(common["store"], fp)
    assert after["int3_g96_asym"] == 1 and {k: v for k, v in after.items() if k != "int3_g96_asym"} == before
    again = prepare(str(tiny_folder), specs=["rtn:int3:g96:asym"], **common)
    assert again.rtn_loss_on_demand == [] and again.features["rtn_loss.int3_g96_asym"] == \
        ctx.features["rtn_loss.int3_g96_asym"]
    df2 = predict_candidates(again, ["rtn:int3:g96:asym"])
    assert not df2["rtn_loss_on_demand"].any() and rtn_loss_rows(common["store"], fp) == after
    # the CLI says so, in text and JSON, and only the first time
    argv = ["predict", "--model", str(tiny_folder), "--calib", common["calib"], "--eval", common["eval"],
            "--seq-len", "32", "--max-windows", "4", "--n-calib", "2", "--store", str(common["store"].path),
            "--spec", "rtn:nf4:g24"]
    capsys.readouterr()
    assert main(argv + ["--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["candidate"]["rtn_loss_on_demand"] and first["rtn_loss_on_demand"] == ["nf4_g24"]
    assert first["candidate"]["estimated_physics"] is False and first["candidate"]["rtn_dl"] is not None
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rtn:nf4:g24" in text and "on demand" not in text and " #" not in text
    assert rtn_loss_rows(common["store"], fp)["nf4_g24"] == 1


def test_estimated_physics_is_flagged_and_widened(tiny_folder, common, tmp_path, capsys):
    """Without a measured RTN loss (withheld here; or a predictor fitted without the probe) the row is
    flagged, in the API, the JSON candidate row and the text footnote, and its interval covers its measured
    neighbours; orderings still hold."""
    from advisor.api import predict_candidates, prepare
    from advisor.cli import main
    from advisor.fitting import load_default_predictor
    from advisor.orderings import order_matrix
    from tests.test_predictor import synthetic_runs

    specs = ["rtn:int4:g32", "rtn:int4:g64", "rtn:int4:g128", "rtn:int4", "rtn:int8:g64", "rtn:int3:g64"]
    ctx = prepare(str(tiny_folder), specs=specs, **common)
    measured = predict_candidates(ctx, specs, predictor=load_default_predictor()).set_index("spec")
    ctx.features = {k: v for k, v in ctx.features.items() if not k.startswith("rtn_loss.int4_g64")}
    ctx.store = Store(tmp_path / "empty.sqlite")  # no stored measurement to fall back on
    df = predict_candidates(ctx, specs, predictor=load_default_predictor(), measure_missing=False)
    assert list(df.loc[df["estimated_physics"], "spec"]) == ["rtn:int4:g64"]
    assert_ordered(df)
    d = df.set_index("spec")
    row = d.loc["rtn:int4:g64"]
    finer = ["rtn:int4:g32", "rtn:int8:g64"]
    assert row["pred_dl_lower"] <= max(0.0, d.loc[finer, "pred_dl_lower"].max()) + 1e-12
    assert row["pred_dl_upper"] >= d.loc[["rtn:int4:g128", "rtn:int4", "rtn:int3:g64"], "pred_dl_upper"].min() - 1e-12
    others = [s for s in specs if s != "rtn:int4:g64"]
    np.testing.assert_allclose(d.loc[others, "pred_dl"], measured.loc[others, "pred_dl"])
    assert order_matrix(specs).sum() >= 8
    # a predictor fitted without rtn_loss runs: every row's physics is the estimate, flagged in the outputs
    runs = synthetic_runs(n_models=9)
    from advisor.predictor import Predictor

    Predictor().fit(runs).calibrate(runs, runs["family"].to_numpy()).save(tmp_path / "old.json")
    argv = ["predict", "--model", str(tiny_folder), "--calib", common["calib"], "--eval", common["eval"],
            "--seq-len", "32", "--max-windows", "4", "--n-calib", "2", "--store", str(common["store"].path),
            "--spec", "rtn:int4:g64", "--predictor", str(tmp_path / "old.json")]
    capsys.readouterr()
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["candidate"]["estimated_physics"] is True
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "rtn:int4:g64" in text and " #" in text and "estimated_physics" in text


def test_plan_and_recommend_keep_every_requested_off_grid_spec(tiny_folder, common, capsys):
    from advisor.cli import main

    specs = ["rtn:fp6_e3m2:g128", "rtn:int3:g256", "gptq:int3:g256", "rtn:nf4:g32", "rtn:int4:g128:asym"]
    base = ["--model", str(tiny_folder), "--calib", common["calib"], "--eval", common["eval"], "--seq-len", "32",
            "--max-windows", "4", "--n-calib", "2", "--store", str(common["store"].path)]
    capsys.readouterr()
    assert main(["plan", *base, "--specs", *specs, "--max-ppl-delta", "1e-12", "--top", "1", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert sorted(r["spec"] for r in out["candidates"]) == sorted(specs)
    assert all({"rtn_dl", "rtn_loss_on_demand", "estimated_physics"} <= set(r) for r in out["candidates"])
    assert main(["plan", *base, "--specs", *specs, "--max-ppl-delta", "1e-12", "--top", "1"]) == 2
    table = capsys.readouterr().out
    assert all(s in table for s in specs) and "more (--top" not in table
    assert main(["recommend", *base, "--specs", *specs, "--max-ppl-delta", "1e9", "--dry-run", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert sorted(c["spec"] for c in rec["candidates"]) == sorted(specs) and rec["spec"] in specs
    assert main(["recommend", *base, "--specs", *specs, "--max-ppl-delta", "1e-12"]) == 2
    text = capsys.readouterr().out
    assert all(s in text for s in specs)
    assert main(["plan", *base, "--specs", "rtn:int4:g64", "--methods", "gptq"]) == 1  # one error line, not both
    assert "either a candidate list" in capsys.readouterr().err


def test_a_sweep_of_off_grid_specs_exports_their_features(tiny_folder, common, tmp_path, capsys):
    """A sweep probes the formats it sweeps, so an off-grid or asymmetric run joins its own features."""
    from advisor.cli import main

    out = tmp_path / "runs.csv"
    assert main(["sweep", "--models", str(tiny_folder), "--specs", "rtn:int3:g96:asym", "rtn:int4:g256",
                 "--calib", common["calib"], "--eval", common["eval"], "--seq-len", "32", "--max-windows", "4",
                 "--n-calib", "2", "--store", str(tmp_path / "s.sqlite"), "--export", str(out)]) == 0
    df = pd.read_csv(out).set_index("spec")
    assert sorted(df.index) == ["rtn:int3:g96:asym", "rtn:int4:g256"] and df["rtn_dl"].notna().all()
    assert df.loc["rtn:int3:g96:asym", "log_so"] != df.loc["rtn:int4:g256", "log_so"]


@pytest.mark.slow
def test_every_format_on_smollm2_is_predicted_in_order(tmp_path):
    """SmolLM2-135M (a 4-5-bit GGUF source): every format x group size gets a measured RTN loss and the
    orderings hold (short protocol: 128-token windows)."""
    from advisor.api import plan
    from advisor.candidates import all_format_specs

    wiki = f"file:{ROOT.parent / 'shared' / 'data' / 'text' / 'wikitext-2-raw-v1' / 'wiki.test.raw'}"
    df = plan("smollm2-135m", specs=all_format_specs("rtn"), calib=wiki, eval=wiki, seq_len=128, max_windows=4,
              n_calib=4, store=Store(tmp_path / "m.sqlite"), progress=False)
    assert df["rtn_dl"].notna().all() and not df["estimated_physics"].any()
    assert assert_ordered(df) > 300
