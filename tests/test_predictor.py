from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest

from advisor.predictor import METHODS, TERMS, Predictor, PredictorError, check_runs, leave_one_group_out


def synthetic_runs(n_models=12, seed=0) -> pd.DataFrame:
    """Runs obeying the model's functional form plus log-normal noise, in 3 families."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(n_models):
        fam = ["llama", "gpt2", "opt"][m % 3]
        log_params, base = rng.uniform(5, 7), rng.uniform(1.5, 3.5)
        knee = rng.uniform(0.02, 0.08)
        for method in METHODS:
            for bits in (2, 3, 4, 6, 8):
                so = 10 ** (1.5 - 0.6 * bits + rng.normal(0, 0.1))
                noise = 2.0 ** -bits * rng.uniform(1, 2)
                shrink = {"rtn": 0, "gptq": -0.5, "awq": -0.3, "quantease": -0.6,
                          "quantease-outlier": -0.9, "nonuniform": -0.2}[method]
                y = (0.2 + 0.95 * np.log(so) + shrink - 0.1 * log_params + 0.1 * base
                     + 0.8 * max(0, np.log(noise / knee)) + rng.normal(0, 0.15))
                rows.append(dict(family=fam, model=f"m{m}", method=method, bits=bits, log_so=np.log(so),
                                 log_params=log_params, baseline_nll=base, noise_over_knee=noise / knee,
                                 sqnr_db=6.02 * bits, group_size=128, dtype_family="int", dl=np.exp(y),
                                 baseline_ppl=np.exp(base)))
    return pd.DataFrame(rows)


def test_lofo_accuracy_and_calibrated_coverage_on_model_shaped_data():
    df = synthetic_runs(n_models=15)
    rep = leave_one_group_out(df, "family")
    assert rep["n_families"] == 3
    assert rep["median_rel_err_dl"] < 0.2
    assert 0.8 <= rep["coverage90"] <= 0.97
    assert rep["spearman"] > 0.95


def test_json_round_trip_and_incompatible_file(tmp_path):
    df = synthetic_runs()
    p = Predictor().fit(df).calibrate(df, df["family"].to_numpy())
    path = p.save(tmp_path / "pred.json")
    q = Predictor.load(path)
    np.testing.assert_allclose(q.predict_interval(df)[2], p.predict_interval(df)[2])
    d = json.loads(path.read_text())
    d["format_version"] = 999
    path.write_text(json.dumps(d))
    with pytest.raises(PredictorError, match="incompatible"):
        Predictor.load(path)


def test_every_coverage_is_calibrated_and_survives_the_json_round_trip(tmp_path):
    """recommend decides at 70%: its multiplier must come from the conformal scores, not Student-t."""
    from scipy import stats

    train, held = synthetic_runs(n_models=15, seed=1), synthetic_runs(n_models=6, seed=2)
    p = Predictor().fit(train).calibrate(train, train["family"].to_numpy())
    q = Predictor.load(p.save(tmp_path / "pred.json"))
    for conf in (0.7, 0.8, 0.9):
        s = p._multiplier(1 - conf)
        assert s != pytest.approx(stats.t.ppf(0.5 + conf / 2, p.df_resid_))  # not the uncalibrated fallback
        assert q._multiplier(1 - conf) == pytest.approx(s, rel=1e-5)
        _, lo, up = p.predict_interval(held, alpha=1 - conf)
        covered = float(np.mean((held["dl"] >= lo) & (held["dl"] <= up)))
        assert abs(covered - conf) < 0.1, (conf, covered)
    assert p._multiplier(0.3) < p._multiplier(0.1) < p._multiplier(0.05)
    assert p.conformal_["0.90"] == pytest.approx(p._multiplier(0.1))


def test_bad_runs_are_refused_with_row_numbers():
    df = synthetic_runs(n_models=3)
    with pytest.raises(PredictorError, match="missing columns.*log_so"):
        check_runs(df.drop(columns=["log_so"]))
    bad = df.copy()
    bad.loc[[4, 9], "dl"] = np.nan
    with pytest.raises(PredictorError, match=r"'dl' is NaN.*\[4, 9\]"):
        check_runs(bad)
    bad = df.copy()
    bad.loc[2, "method"] = "gtpq"
    with pytest.raises(PredictorError, match=r"unknown method in rows \[2\]"):
        check_runs(bad)


def test_additive_noise_keeps_coverage_where_measurements_are_noise():
    """A first-order term of sd kappa * sqrt(dL) swamps tiny dL (8-bit formats: measured +-noise, often
    negative): the noise model must cover those runs without widening large-dL intervals."""
    df = synthetic_runs(n_models=15)
    true = df["dl"].to_numpy()
    rng = np.random.default_rng(5)
    df["dl"] = true + 0.03 * np.sqrt(true) * rng.normal(size=len(df))
    assert (df["dl"] < 0).sum() >= 10
    rep = leave_one_group_out(df, "family")
    assert 0.83 <= rep["coverage90"] <= 0.97
    mixed = Predictor().fit(df).calibrate(df, df["family"].to_numpy())
    assert mixed.noise_kappa_ == pytest.approx(0.03, rel=0.5)
    tiny = df[true < 1e-3]
    lo, up = mixed.predict_interval(tiny)[1:]
    assert np.mean((tiny["dl"] >= lo) & (tiny["dl"] <= up)) > 0.8
    big = df[true > 0.05]
    mean, lo, up = mixed.predict_interval(big)
    assert np.median(up / mean) < 2.0  # the noise does not inflate the log-space spread


def test_same_data_gives_identical_predictions():
    """Determinism (issue 9): fitting, calibration and the forest baseline depend only on the data."""
    from advisor.predictor import fit_forest, forest_matrix

    df = synthetic_runs()
    a = Predictor().fit(df).calibrate(df, df["family"].to_numpy())
    b = Predictor().fit(df.sample(frac=1.0, random_state=3).sort_index()).calibrate(df, df["family"].to_numpy())
    for x, y in zip(a.predict_interval(df), b.predict_interval(df)):
        np.testing.assert_array_equal(x, y)
    assert a.conformal_ == b.conformal_
    np.testing.assert_array_equal(fit_forest(df).predict(forest_matrix(df)), fit_forest(df).predict(forest_matrix(df)))


SHRINK = {"rtn": 1.0, "gptq": 0.6, "awq": 0.7, "quantease": 0.55, "quantease-outlier": 0.45, "nonuniform": 0.8}


def measured_runs(rng, models, scale_lo, scale_hi, rise, shrink=SHRINK) -> pd.DataFrame:
    """Runs with the rtn_loss probe: RTN's loss rises beyond the quadratic bowl (``rise``) and each method
    multiplies it by ``shrink[method]``; ``scale`` sets the size of the losses (a zoo toy vs a real LLM).
    Model sizes and baselines differ (without effect on the loss), so the scale terms are identifiable."""
    rows = []
    for m in models:
        scale = rng.uniform(scale_lo, scale_hi)
        for method in METHODS:
            for bits in (2, 3, 4, 6, 8):
                so = scale * 10 ** (1.2 - 0.6 * bits)
                true_rtn = so * (1 + rise * so)  # the rise beyond the quadratic bowl, unseen at small scale
                se = 0.02 * true_rtn + 1e-5
                rows.append(dict(family=f"f{m % 3}", model=f"m{m}", method=method, bits=bits, log_so=np.log(so),
                                 log_params=5.5 + 0.1 * (m % 7), baseline_nll=3.0 + 0.05 * (m % 5), noise_over_knee=0.5, sqnr_db=6.02 * bits,
                                 group_size=128, dtype_family="int", rtn_dl=true_rtn + se * rng.normal(),
                                 rtn_dl_se=se, dl=true_rtn * shrink[method] * np.exp(rng.normal(0, 0.08)),
                                 baseline_ppl=20.0))
    return pd.DataFrame(rows)


def test_scale_corrections_do_not_extrapolate():
    """A model far outside the fitted scale range is predicted with its corrections clipped to that range."""
    df = synthetic_runs()
    p = Predictor().fit(df)
    row = df.head(3).copy()
    far = row.assign(log_params=20.0, baseline_nll=-5.0)
    edge = row.assign(log_params=df["log_params"].max(), baseline_nll=df["baseline_nll"].min())
    np.testing.assert_allclose(p.predict(far), p.predict(edge))
    q = Predictor.from_dict(json.loads(json.dumps(p.to_dict())))
    np.testing.assert_allclose(q.predict(far), p.predict(far))
    # and users are told: the model's scale terms outside the fitted range, named with their values
    from advisor.report import scale_note

    assert p.outside_fitted_range(row) == {} and scale_note({}) == []
    out = q.outside_fitted_range(far)
    assert set(out) == {"log_params", "baseline_nll"} and out["log_params"]["value"] == 20.0
    assert out["baseline_nll"]["fitted"] == [df["baseline_nll"].min(), df["baseline_nll"].max()]
    assert set(q.outside_fitted_range(row.assign(baseline_nll=-5.0))) == {"baseline_nll"}
    note = scale_note(out)[0]
    assert "1e+14M non-embedding parameters" in note and "baseline NLL -5.00 nats" in note


def test_measured_rtn_loss_carries_a_model_outside_the_fitted_regime():
    """With the rtn_loss probe, the physics term is measured on the model itself: a model whose losses are
    100x those of every fitted model (a real LLM after a zoo of flat toys) is predicted within the
    noise, while the second-order fallback, fitted where the loss stays quadratic, misses it."""
    rng = np.random.default_rng(1)
    runs = functools.partial(measured_runs, rng)

    train = runs(range(12), 1e-4, 1e-2, rise=3.0)
    test = runs([99], 1.0, 1.0, rise=3.0)
    p = Predictor().fit(train).calibrate(train, train["family"].to_numpy())
    big = test[test["dl"] > 0.01]
    rel = np.abs(p.predict(big) / big["dl"] - 1)
    assert np.median(rel) < 0.12
    mean, lo, up = p.predict_interval(big)
    assert np.mean((big["dl"] >= lo) & (big["dl"] <= up)) > 0.8
    # without the measurement the same rows fall back to the second-order term and miss the rise
    blind = big.assign(rtn_dl=np.nan)
    assert np.median(np.abs(p.predict(blind) / big["dl"] - 1)) > 2 * np.median(rel)
    # a measurement lost in its noise is not used: with a standard error far beyond the prior's width, the
    # calibrated loss is the prior c * SO
    noisy = big.head(4).assign(rtn_dl=1e-3, rtn_dl_se=1e6)
    np.testing.assert_allclose(p.predict(noisy), p.predict(big.head(4).assign(rtn_dl=np.nan)), rtol=1e-9)
    q = Predictor.from_dict(json.loads(json.dumps(p.to_dict())))
    np.testing.assert_array_equal(q.predict(big), p.predict(big))


def test_a_predictor_fitted_without_rtn_loss_ignores_it():
    """Runs files from before the rtn_loss probe (or a user's without it) fit the second-order model
    alone; rows that do carry a measurement are then predicted exactly as rows without one."""
    df = synthetic_runs()
    p = Predictor().fit(df)
    assert not p.use_measured_
    rows = df.head(5)
    with_meas = rows.assign(rtn_dl=rows["dl"] * 3, rtn_dl_se=1e-6)
    np.testing.assert_array_equal(p.predict(with_meas), p.predict(rows))
    q = Predictor.from_dict(json.loads(json.dumps(p.to_dict())))
    np.testing.assert_array_equal(q.predict(with_meas), p.predict(rows))


def test_calibrated_rtn_loss_is_the_posterior_mean_and_the_prior_is_recovered():
    """The closed form of calibrated_rtn_loss equals the posterior mean of the RTN loss computed by
    numerical integration (normal prior N(c SO, (tau c SO)^2) x normal measurement N(D, se^2)), and
    fit_rtn_prior recovers (c, tau) from measurements drawn from that model."""
    from advisor.predictor import calibrated_rtn_loss, fit_rtn_prior

    c, tau = 1.3, 0.6
    so = np.array([1e-3, 1e-3, 0.5, 2.0, 0.01])
    rtn = np.array([3e-3, -1e-3, 0.9, 2.2, np.nan])
    se = np.array([2e-3, 5e-3, 0.01, 1.0, np.nan])
    df = pd.DataFrame({"log_so": np.log(so), "rtn_dl": rtn, "rtn_dl_se": se})
    got = calibrated_rtn_loss(df, (c, tau))
    for i in range(4):
        m, sp = c * so[i], tau * c * so[i]
        grid = np.linspace(m - 12 * sp, m + 12 * sp, 200001)
        logw = -0.5 * ((grid - m) / sp) ** 2 - 0.5 * ((rtn[i] - grid) / se[i]) ** 2
        w = np.exp(logw - logw.max())
        assert got[i] == pytest.approx(np.sum(w * grid) / np.sum(w), rel=1e-6, abs=1e-12)
    assert got[4] == pytest.approx(c * so[4])  # no measurement: the prior mean
    assert got[2] == pytest.approx(0.9, rel=0.01)  # a precise measurement stands

    rng = np.random.default_rng(0)
    so = np.exp(rng.uniform(-8, 0, 400))
    true = c * so * (1 + tau * rng.normal(size=so.size))
    se = 0.3 * c * so * rng.uniform(0.1, 1, so.size)
    rows = pd.DataFrame({"log_so": np.log(so), "rtn_dl": true + se * rng.normal(size=so.size), "rtn_dl_se": se})
    c_hat, tau_hat = fit_rtn_prior(rows, tau_floor=0.0)
    assert c_hat == pytest.approx(c, rel=0.1) and tau_hat == pytest.approx(tau, rel=0.15)
    assert fit_rtn_prior(rows, tau_floor=2.0)[1] == 2.0
    assert fit_rtn_prior(rows.head(5)) is None  # too few measurements: the fallback design


def test_a_method_gain_is_not_extrapolated_beyond_the_losses_it_was_fitted_on():
    """The guard on extrapolated method gains (docs/predictor.md). Fitted where every method shrinks
    RTN's loss by 30-55% (a zoo of toys), predicted on a model whose losses are 100x larger and where the
    methods gain only 10% (a real LLM collapsing at 2 bits): both designs flag those rows as extrapolated;
    without the guard the method intervals exclude the measurement; with it their upper bound reaches RTN's
    prediction ("no gain" is not excluded), while the point predictions and every row inside the fitted
    range stay as they were. (A method with no gain at all sits at the edge: half its runs lie above RTN's
    prediction.)"""
    rng = np.random.default_rng(2)
    train = measured_runs(rng, range(12), 1e-4, 1e-2, rise=3.0)
    test = measured_runs(rng, [99], 1.0, 1.0, rise=3.0, shrink={m: 1.0 if m == "rtn" else 0.9 for m in METHODS})
    guarded = Predictor().fit(train).calibrate(train, train["family"].to_numpy())
    d = guarded.to_dict()
    unguarded = Predictor.from_dict(d)
    unguarded.method_guard = False
    big = test[(test["dl"] > 0.3) & (test["method"] != "rtn")]
    assert len(big) >= 5 and guarded.extrapolated_methods(big).all() and unguarded.extrapolated_methods(big).all()
    mean_g, lo_g, up_g = guarded.predict_interval(big)
    mean_u, lo_u, up_u = unguarded.predict_interval(big)
    np.testing.assert_array_equal(mean_g, mean_u)
    np.testing.assert_array_equal(lo_g, lo_u)
    assert np.mean(big["dl"] <= up_u) < 0.5  # the fitted gain, extrapolated, excludes what was measured
    assert (up_g >= guarded.predict(big.assign(method="rtn")) * (1 - 1e-12)).all()
    assert np.mean((big["dl"] >= lo_g) & (big["dl"] <= up_g)) > 0.8
    # inside the range each method was fitted on, the guard changes nothing
    inside = train[train["method"] != "rtn"]
    assert not guarded.extrapolated_methods(inside).any()
    np.testing.assert_array_equal(np.column_stack(guarded.predict_interval(inside)),
                                  np.column_stack(unguarded.predict_interval(inside)))
    # the ranges travel with the predictor file
    q = Predictor.from_dict(json.loads(json.dumps(d)))
    assert q.method_range_ == guarded.method_range_
    np.testing.assert_array_equal(np.column_stack(q.predict_interval(big)), np.column_stack(guarded.predict_interval(big)))


def test_refit_on_the_shipped_runs_gives_the_shipped_predictor():
    """The one fitting path reproduces advisor/data/predictor.json from advisor/data/runs.csv: coefficients to
    two decimals (the joint likelihood is flat along a few directions: the file was fitted to looser
    tolerances), noise scales and conformal multipliers to 0.1%, and every prediction on the shipped runs."""
    from advisor.fitting import SHIPPED_PREDICTOR, fit, shipped_runs

    shipped = Predictor.load(SHIPPED_PREDICTOR)
    runs = shipped_runs()
    refit = fit(runs)
    assert refit.n_train_ == shipped.n_train_ and refit.df_resid_ == shipped.df_resid_
    np.testing.assert_allclose(refit.coef_, shipped.coef_, atol=0.005)
    np.testing.assert_array_equal(np.round(refit.coef_, 2), np.round(shipped.coef_, 2))
    assert refit.rtn_prior_ == pytest.approx(shipped.rtn_prior_, rel=1e-9)
    assert refit.resid_std_ == pytest.approx(shipped.resid_std_, rel=1e-3)
    assert refit.noise_kappa_ == pytest.approx(shipped.noise_kappa_, rel=1e-3)
    for k, v in shipped.conformal_.items():
        assert refit.conformal_[k] == pytest.approx(v, rel=1e-3)
    for a, b in zip(refit.predict_interval(runs), shipped.predict_interval(runs)):
        np.testing.assert_allclose(a, b, rtol=0.01, atol=1e-6)


def test_the_fit_does_not_depend_on_where_the_optimizer_starts():
    """One estimator: the joint likelihood's maximum, run to convergence, whatever the start."""
    from advisor.predictor import design_matrix, fit_rtn_prior, joint_mle, log_target

    rng = np.random.default_rng(3)
    df = measured_runs(rng, range(9), 1e-4, 1e-1, rise=3.0)
    p = Predictor().fit(df)
    A, off, _ = design_matrix(df, fit_rtn_prior(df), None)
    used = A.any(axis=0)
    beta, sr, kappa = joint_mle(A[:, used], df["dl"].to_numpy(float), np.zeros(used.sum()), 1.0, 0.1, off)
    np.testing.assert_allclose(beta, p.coef_[used], atol=1e-4)
    assert sr == pytest.approx(p.resid_std_, rel=1e-4) and kappa == pytest.approx(p.noise_kappa_, rel=1e-3)
    assert log_target([-1.0])[0] == np.log(1e-4)


def test_runs_that_cannot_separate_the_terms_are_refused_naming_them():
    """One model (one size, one baseline): its scale terms are the intercept again. Refused, not fitted."""
    df = synthetic_runs(n_models=3)
    one = df[df["model"] == "m0"]
    with pytest.raises(PredictorError, match=r"log_params.*not separable.*--with-shipped"):
        Predictor().fit(one)
    p = Predictor().fit(df[df["method"] != "awq"])  # an absent method is not a dependence: its terms are 0
    assert p.coef_[TERMS.index("method[awq]")] == 0 and p.coef_[TERMS.index("method[awq]:bits")] == 0
