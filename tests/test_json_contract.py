"""Every command's --json is strict JSON (no NaN/Infinity), stamped, and the measurement contract holds:
quantize reports dl_se and KL statistics, recommend's attempts carry spec, bytes and measured dPPL, and
quantize with recommend's options reproduces recommend's measurement."""
from __future__ import annotations

import json

import pytest

from advisor.cli import main
from tests.conftest import PTB
from tests.test_predictor import synthetic_runs

pytestmark = pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")


def strict(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_folder):
    from advisor.predictor import Predictor

    tmp = tmp_path_factory.mktemp("json")
    df = synthetic_runs(n_models=9)
    Predictor().fit(df).calibrate(df, df["family"].to_numpy()).save(tmp / "pred.json")
    proto = ["--calib", f"file:{PTB}", "--eval", f"file:{PTB}", "--seq-len", "32", "--max-windows", "4",
             "--n-calib", "2"]
    return dict(tmp=tmp, model=str(tiny_folder), proto=proto, store=str(tmp / "m.sqlite"), pred=str(tmp / "pred.json"))


def run(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


STAMP = {"advisor_version", "created", "confidence", "protocol_fingerprint"}


def test_every_json_output_is_strict_and_stamped(setup, capsys):
    s = setup
    common = ["--model", s["model"], *s["proto"], "--store", s["store"], "--predictor", s["pred"]]
    outs = {}
    for name, argv in {
        "eval": ["eval", "--model", s["model"], "--eval", f"file:{PTB}", "--seq-len", "32", "--max-windows", "3"],
        "quantize": ["quantize", "--model", s["model"], "--spec", "rtn:int4:g16", *s["proto"]],
        "predict": ["predict", *common],
        "predict-spec": ["predict", *common, "--spec", "rtn:int8"],
        "plan": ["plan", *common, "--max-ppl-delta", "1e6"],
        "recommend": ["recommend", *common, "--max-ppl-delta", "1e6", "--methods", "rtn", "--max-attempts", "1",
                      "--out", str(s["tmp"] / "rep")],
        "sweep": ["sweep", "--models", s["model"], "--specs", "rtn:int8", *s["proto"], "--store", s["store"], "--no-probes"],
        "ls": ["ls", "methods"],
    }.items():
        code, out = run(capsys, *argv, "--json")
        assert code == 0, name
        outs[name] = strict(out)
    for name in ("eval", "quantize", "predict", "predict-spec", "plan", "recommend"):
        assert STAMP <= set(outs[name]), name
        assert outs[name]["created"].endswith("Z") and outs[name]["protocol_fingerprint"]
    assert outs["plan"]["confidence"] == outs["recommend"]["confidence"] == 0.9
    # one candidate row schema for predict, plan and recommend
    keys = {name: set(outs[name]["candidates"][0]) for name in ("predict", "plan", "recommend")}
    shared = {"spec", "bytes", "bits_per_weight", "relative_speed", "pred_dl", "pred_dl_lower", "pred_dl_upper",
              "pred_dppl", "pred_dppl_lower", "pred_dppl_upper", "tie_break", "method_gain_extrapolated", "rtn_dl",
              "rtn_dl_se", "rtn_loss_on_demand", "estimated_physics"}
    assert all(shared <= k for k in keys.values())
    assert shared <= set(outs["predict-spec"]["candidate"])
    # the same protocol gives the same fingerprint in every command
    assert outs["predict"]["protocol_fingerprint"] == outs["plan"]["protocol_fingerprint"] \
        == outs["recommend"]["protocol_fingerprint"] == outs["quantize"]["protocol_fingerprint"]
    # recommendation.json on disk is strict too, and keeps its contract
    rec = strict((s["tmp"] / "rep" / "recommendation.json").read_text())
    assert {"spec", "verified", "measured_ppl_delta", "attempts"} <= set(rec) and STAMP <= set(rec)
    assert all({"spec", "bytes", "measured_ppl_delta", "dl_se", "kld"} <= set(a) for a in rec["attempts"])


def test_quantize_reports_dl_se_and_kl_and_reproduces_recommend(setup, capsys):
    s = setup
    code, out = run(capsys, "recommend", "--model", s["model"], *s["proto"], "--store", s["store"], "--predictor",
                    s["pred"], "--max-ppl-delta", "1e6", "--methods", "rtn", "--max-attempts", "1", "--json")
    rec = strict(out)
    assert code == 0 and rec["verified"]
    code, out = run(capsys, "quantize", "--model", s["model"], "--spec", rec["spec"], *s["proto"], "--json")
    q = strict(out)
    assert code == 0 and q["dl_se"] > 0
    assert {"mean", "median", "p99", "max", "same_top_rate"} <= set(q["kld"])
    assert 0 <= q["kld"]["median"] <= q["kld"]["p99"] <= q["kld"]["max"] and 0 <= q["kld"]["same_top_rate"] <= 1
    (attempt,) = rec["attempts"]
    assert q["ppl_delta"] == pytest.approx(rec["measured_ppl_delta"], rel=1e-6, abs=1e-9)
    assert q["dl_se"] == pytest.approx(attempt["dl_se"], rel=1e-6)
    assert q["kld"]["mean"] == pytest.approx(attempt["kld"]["mean"], rel=1e-5)
    assert q["protocol_fingerprint"] == rec["protocol_fingerprint"]
