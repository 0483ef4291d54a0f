"""Hostile predictor files, runs files and spec strings: one clear error naming the file, never a wrong answer.

Each damaged predictor file is refused before any model loads (``advisor predict --predictor``), with one
``error:`` line that names the file and what to do, no traceback, and the file left as it was. The
parsers (spec strings, predictor JSON, runs CSV) are fuzzed with hypothesis, bounded in examples and time:
each input either parses into something valid or raises the parser's own error type.
"""
from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor.cli import main
from advisor.fitting import SHIPPED_PREDICTOR, SHIPPED_RUNS, read_runs
from advisor.predictor import Predictor, PredictorError

SHIPPED = json.loads(SHIPPED_PREDICTOR.read_text())
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _damaged(**changes) -> dict:
    d = copy.deepcopy(SHIPPED)
    for key, value in changes.items():
        d[key] = value(d[key]) if callable(value) else value
    return d


def _nan_first(values):
    return [math.nan] + values[1:]


def _inf_cov(cov):
    cov[0][0] = math.inf
    return cov


CASES = {
    "nan coefficient": (_damaged(coef=_nan_first), "'coef' must be finite"),
    "infinite covariance": (_damaged(cov=_inf_cov), "'cov' must be finite"),
    "negative residual std": (_damaged(resid_std=-0.3), "'resid_std' must be a finite number above 0"),
    "zero residual std": (_damaged(resid_std=0), "'resid_std' must be a finite number above 0"),
    "negative noise kappa": (_damaged(noise_kappa=-1e-3), "'noise_kappa' must be a finite number >= 0"),
    "short coefficients": (_damaged(coef=lambda c: c[:-1]), "'coef' must be finite numbers of shape (16,)"),
    "string coefficient": (_damaged(coef=lambda c: ["x"] + c[1:]), "'coef' must be numbers"),
    "asymmetric covariance": (_damaged(cov=lambda c: [[v + (i < j) for j, v in enumerate(row)]
                                                      for i, row in enumerate(c)]), "symmetric covariance"),
    "negative conformal multiplier": (_damaged(conformal={"0.90": -1.0}), "'conformal[0.90]' must be a finite"),
    "nan conformal score": (_damaged(conformal_scores=_nan_first), "'conformal_scores' must be finite"),
    "inverted range": (_damaged(ranges=lambda r: {**r, "log_params": [7.0, 5.0]}), "low 7.0 above high 5.0"),
    "missing range": (_damaged(ranges=lambda r: {k: v for k, v in r.items() if k != "baseline_nll"}),
                      "'ranges' must give"),
    "bad prior": (_damaged(rtn_prior=[1.0, -0.5]), "'rtn_prior tau' must be a finite number above 0"),
    "zero training runs": (_damaged(n_train=0), "'n_train' must be a positive integer"),
    "another design": (_damaged(design_options=lambda o: {**o, "method_log_r": True}), "incompatible"),
    "another format": (_damaged(format_version=5), "incompatible"),
    "not a predictor": ({"kind": "something else"}, "is not an advisor predictor file"),
    "a list": ([1, 2, 3], "is not an advisor predictor file"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_damaged_predictor_file_is_refused_before_the_model_loads(name, tmp_path, capsys):
    record, message = CASES[name]
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(record))  # json.dumps writes NaN / Infinity, as a careless tool would
    before = path.read_bytes()
    code = main(["predict", "--model", str(tmp_path / "no-such-model"), "--predictor", str(path)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in err and message in err, err
    assert "Traceback" not in err and "internal error" not in err
    assert path.read_bytes() == before


def test_nan_literals_and_bad_bytes_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(SHIPPED).replace(f'"resid_std": {SHIPPED["resid_std"]}', '"resid_std": NaN', 1))
    with pytest.raises(PredictorError, match=f"predictor file {path}: 'resid_std' must be a finite number"):
        Predictor.load(path)
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(PredictorError, match="cannot be read|not valid JSON"):
        Predictor.load(path)


def test_the_shipped_file_and_a_saved_refit_are_valid(tmp_path):
    p = Predictor.from_dict(SHIPPED)
    again = Predictor.load(p.save(tmp_path / "p.json"))
    np.testing.assert_array_equal(again.coef_, p.coef_)
    assert "NaN" not in (tmp_path / "p.json").read_text()


# -- fuzz --------------------------------------------------------------------------------------------

@FUZZ
@given(st.text(alphabet="rtngpqawseiofmxuc0123456789:_-. gG", max_size=30))
def test_spec_strings_parse_or_raise_value_error(text):
    """``QuantSpec.parse``: a spec that parses prints back to a string that parses to the same spec."""
    from advisor.quantizers import QuantSpec

    try:
        spec = QuantSpec.parse(text)
    except ValueError:
        return
    assert QuantSpec.parse(str(spec)) == spec


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) |
                           st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=4), max_leaves=12)


@FUZZ
@given(st.sampled_from(sorted(SHIPPED)), JSON_VALUES)
def test_a_predictor_record_with_any_field_replaced_loads_valid_or_is_refused(key, value):
    d = copy.deepcopy(SHIPPED)
    d[key] = value
    try:
        p = Predictor.from_dict(d)
    except PredictorError:
        return
    # what loads predicts finite numbers on the shipped runs
    rows = pd.read_csv(SHIPPED_RUNS).head(40)
    for a in p.predict_interval(rows):
        assert np.isfinite(a).all(), key


@FUZZ
@given(st.sampled_from(list(SHIPPED)), st.data())
def test_a_predictor_record_missing_a_field_loads_or_is_refused(key, data):
    d = {k: v for k, v in SHIPPED.items() if k != key}
    try:
        Predictor.from_dict(d)
    except PredictorError:
        pass


RUNS_HEAD = pd.read_csv(SHIPPED_RUNS).head(12)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 11), st.sampled_from(list(RUNS_HEAD.columns)),
                          st.one_of(st.text(max_size=6), st.floats(allow_nan=True, allow_infinity=True),
                                    st.none())), max_size=5),
       st.integers(0, 200), st.binary(max_size=20))
def test_a_damaged_runs_file_is_read_valid_or_refused_naming_it(tmp_path, cells, cut, garbage):
    df = RUNS_HEAD.copy().astype(object)
    for row, col, value in cells:
        df.loc[row, col] = value
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    text = buf.getvalue().encode()
    path = tmp_path / "runs.csv"
    path.write_bytes(text[: len(text) - cut] + garbage)
    try:
        out = read_runs(path)
    except PredictorError as e:
        assert str(path) in str(e)
        return
    assert len(out) and np.isfinite(out["dl"].astype(float)).all()
