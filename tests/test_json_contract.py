"""Every command's --json is strict JSON (no NaN/Infinity), stamped, valid against the JSON Schema in
docs/schema/advisor-output.schema.json, and the measurement contract holds: quantize reports dl_se and KL
statistics, recommend's attempts carry spec, bytes and measured dPPL, and quantize with recommend's
options reproduces recommend's measurement."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
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
SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "schema" / "advisor-output.schema.json").read_text())


def validate(doc, kind: str) -> None:
    """``doc`` against the schema's definition of ``kind`` (and against the whole schema)."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(doc, {"$schema": SCHEMA["$schema"], "$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{kind}"},
                        cls=jsonschema.Draft202012Validator)
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)


def test_the_schema_rejects_what_the_contract_forbids():
    """The schema is not vacuous: a document without its stamp, a NaN-turned-string, a candidate row with a
    key of another schema, a quantize document without dl_se or KL all fail."""
    good = {"advisor_version": "1", "created": "2026-01-01T00:00:00Z", "confidence": None,
            "protocol_fingerprint": "0123abcd", "ppl": 1.5, "nll": 0.4, "n_tokens": 3, "seconds": 0.1,
            "protocol": {}, "model": {}}
    validate(good, "eval")
    for bad in ({k: v for k, v in good.items() if k != "created"}, dict(good, created="2026-01-01T00:00:00+01:00"),
                dict(good, ppl="NaN"), dict(good, confidence=1.0)):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, "eval")
    with pytest.raises(jsonschema.ValidationError):
        validate(dict(good, spec="rtn:int8", bits_per_weight=8.0, baseline_ppl=1.0, ppl_delta=0.0, dl=0.0,
                      baseline_nll=0.4, n_windows=3, quantize_seconds=0.0, packed=True, calibration={}), "quantize")


def test_every_json_output_is_strict_and_stamped(setup, capsys):
    s = setup
    common = ["--model", s["model"], *s["proto"], "--store", s["store"], "--predictor", s["pred"]]
    outs = {}
    kinds = {"eval": "eval", "quantize": "quantize", "predict": "predict", "predict-spec": "predict", "plan": "plan",
             "recommend": "recommend", "recommend-kld": "recommend", "sweep": "sweep", "probe": "probe", "fit": "fit",
             "ls": "listing", "zoo": "listing"}
    from tests.test_predictor import synthetic_runs as runs

    runs(n_models=9).to_csv(s["tmp"] / "runs.csv", index=False)
    for name, argv in {
        "eval": ["eval", "--model", s["model"], "--eval", f"file:{PTB}", "--seq-len", "32", "--max-windows", "3"],
        "quantize": ["quantize", "--model", s["model"], "--spec", "rtn:int4:g16", *s["proto"]],
        "predict": ["predict", *common],
        "predict-spec": ["predict", *common, "--spec", "rtn:int8"],
        "plan": ["plan", *common, "--max-ppl-delta", "1e6"],
        "recommend": ["recommend", *common, "--max-ppl-delta", "1e6", "--methods", "rtn", "--max-attempts", "1",
                      "--out", str(s["tmp"] / "rep")],
        "sweep": ["sweep", "--models", s["model"], "--specs", "rtn:int8", *s["proto"], "--store", s["store"], "--no-probes"],
        "recommend-kld": ["recommend", *common, "--max-kld", "1e6", "--methods", "rtn", "--max-attempts", "1",
                          "--no-early-stop", "--out", str(s["tmp"] / "rep-kld")],
        "probe": ["probe", "--model", s["model"], "--calib", f"file:{PTB}", "--probes", "sqnr", "--n-calib", "2",
                  "--calib-seq-len", "32", "--store", s["store"]],
        "fit": ["fit", "--runs", str(s["tmp"] / "runs.csv")],
        "ls": ["ls", "methods"],
        "zoo": ["zoo", "list"],
    }.items():
        code, out = run(capsys, *argv, "--json")
        assert code == 0, name
        outs[name] = strict(out)
        validate(outs[name], kinds[name])
    for name in ("eval", "quantize", "predict", "predict-spec", "plan", "recommend", "recommend-kld", "sweep",
                 "probe", "fit"):
        assert STAMP <= set(outs[name]), name
        assert outs[name]["created"].endswith("Z")
        assert outs[name]["protocol_fingerprint"] or name in ("sweep", "fit")  # several protocols: none single
    kl = outs["recommend-kld"]
    assert kl["verified"] and kl["budget_metric"] == "kld" and kl["kld_source"] == "measured"
    assert kl["max_kld"] == 1e6 and kl["max_ppl_delta"] is None and kl["attempts"][0]["kld"]["mean"] >= 0
    assert kl["early_stop"] is False and outs["recommend"]["early_stop"] is True
    assert kl["attempts"][0]["n_windows"] == 4 and kl["attempts"][0]["verdict"] == "pass"
    report = (s["tmp"] / "rep-kld" / "report.md").read_text()
    assert "mean KL measured, not predicted" in report and "PASS" in report
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
    validate(rec, "recommend")
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
