"""The fitted predictor of dL = ln(ppl_q / ppl_fp), the mean-NLL increase caused by a quantization spec.

Formula. The physics term R is the loss increase of round-to-nearest at the spec's format. The
``rtn_loss`` probe measures it (all orders, on calibration windows, with a standard error se); the
``second_order`` probe estimates it (1/2 sum_i F_ii e_i^2 =: SO). R is the expected RTN loss given
both (regression calibration: the posterior mean under the prior N(c SO, (tau c SO)^2),
``calibrated_rtn_loss``), so a precise measurement stands and one lost in its noise gives way to the
estimate. The model works in log space and corrects the physics with fitted terms:

    log D = [R > 1e-4] * (a0 + log R)
            + [R <= 1e-4] * (b0 + b1 * log SO + b2 * max(0, log(noise / knee)))
            + sum_m [method = m] * (c_m + d_m * bits) + e1 * log10(params) + e2 * baseline_nll

- ``method`` terms: GPTQ, AWQ, QuantEase... shrink the effective error, by an amount that depends on bits;
- ``log10(params)``, ``baseline_nll``: scale (larger, better-trained models have flatter landscapes),
  clipped to the range seen in fitting;
- the hinge on ``noise / knee`` (RTN relative noise over the knee of the radial loss curve from the
  ``perturbation`` probe): the step-like rise once the noise leaves the flat region. A measured RTN
  loss already contains it, so it corrects only the second-order fallback.

Fit. Measured dL is D plus a first-order term g . e whose sign is random (the evaluation set's gradient
is not zero), with sd ``kappa * sqrt(D)``: about a milli-nat on the zoo, which swamps the curvature term
of 6-8-bit formats (their measured dL is often negative). The coefficients and both variance components
are therefore one maximum-likelihood estimate of ``y ~ N(D, sigma_r^2 D^2 + kappa^2 D)``, started from
least squares in log space; sigma_r and kappa are bounded below (SIGMA_FLOOR, KAPPA_FLOOR). The prior
(c, tau) is fitted first, by maximum likelihood of the ``rtn_loss`` measurements (``fit_rtn_prior``).

Interval. A multiplicative part (``sigma_log``: residual and parameter sd in log space) and an
additive one:

    [D * exp(-s * sigma_log) - s * kappa * sqrt(D),  D * exp(+s * sigma_log) + s * kappa * sqrt(D)]

The multiplier ``s`` is calibrated by split-conformal on grouped (leave-one-family-out) scores, so that
a 90% interval covers about 90% of held-out runs (Student's t quantile before calibration). Where a
method's physics term R exceeds the largest R of that method's fitted runs, its gain over RTN is an
extrapolation (the zoo's method runs reach R = 0.03-0.3 nats; a real LLM collapses at 2 bits whatever
the solver): the interval's upper bound is then at least RTN's prediction at the same format, and
``extrapolated_methods`` flags those rows. Point predictions are not changed by it.

A scikit-learn random forest on the published feature set (parameter count, baseline NLL, RTN SQNR,
format descriptors) is the baseline it must beat. How this design was chosen, and the variants it was
measured against: docs/experiments.md. The fitted model is stored as JSON, never as a pickle.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FORMAT_VERSION = 6
# The noise model's variance components are bounded below: on the zoo alone (13 models, few runs with a
# large dL) the likelihood is flat in sigma_r and drives it to 0; real measurements have both a model
# error and first-order noise.
SIGMA_FLOOR = 0.1  # log-space model error
KAPPA_FLOOR = 0.005  # sqrt-nats
DL_FLOOR = 1e-4  # nats; measured dL below this (8-bit noise, even negative) is floored in log space
METHODS = ("rtn", "gptq", "awq", "quantease", "quantease-outlier", "nonuniform")
FOREST_FEATURES = ("log_params", "baseline_nll", "sqnr_db", "bits", "group_log2", "is_int", "is_fp", "is_nf",
                   "is_mx", "m_rtn", "m_gptq", "m_awq", "m_quantease", "m_quantease-outlier", "m_nonuniform")
REQUIRED_COLUMNS = ("method", "bits", "log_so", "log_params", "baseline_nll", "noise_over_knee")
# Optional columns rtn_dl, rtn_dl_se: the rtn_loss probe (NaN or absent = not run: the second-order fallback).
TARGET_ABS_DL, TARGET_REL_DL = 0.02, 0.15  # accuracy target: |err| <= max(0.02 nats, 15% of the measured dL)
MIN_MEASURED_RUNS = 10  # fewer fitted runs with a usable rtn_loss: the measured terms are not used
# The second-order prior of the RTN loss is no narrower than sd = half its mean: it truncates the Taylor
# series with a diagonal curvature, so off the families it was fitted on its error is not bounded by what
# they show (SmolLM2: measured / estimated 0.6-1.2). Fitted on data where it happens to be exact, a narrow
# prior would overrule precise measurements of a model beyond the fitted regime (tests/test_predictor.py).
PRIOR_TAU_FLOOR = 0.5
# Correction terms clipped to the range seen in fitting when predicting: the physics term carries a new
# model's scale; the corrections must not extrapolate (a 135M-parameter model with a code NLL of 1.5 is far
# outside a zoo of 0.1-5M-parameter models with NLL 4.7-5.9).
CLIPPED = ("log_params", "baseline_nll", "hinge_noise_over_knee")
TERMS = ("measured", "fallback", "fallback:log_so",
         *(f"method[{m}]{part}" for m in METHODS[1:] for part in ("", ":bits")),
         "log_params", "baseline_nll", "fallback:hinge_noise_over_knee")
# Predictor files record the design they were fitted with; this is the one design there is.
DESIGN_OPTIONS = {"calibrated": True, "fixed_slope": True, "scale_on_measured": True, "measured_z": 3.0,
                  "prior_tau_floor": PRIOR_TAU_FLOOR, "method_guard": True, "method_log_r": False}
REFIT = "refit it with `advisor fit --with-shipped --out PRED.json`"


class PredictorError(ValueError):
    """Bad fitting data or an incompatible predictor file."""


def rtn_measurement(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(rtn_dl, rtn_dl_se) per row as floats: NaN where the ``rtn_loss`` probe was not run (no column or
    empty), standard error 0 where the file has no ``rtn_dl_se`` column."""
    def column(name: str, missing: float) -> np.ndarray:
        if name not in df.columns:
            return np.full(len(df), missing)
        return pd.to_numeric(df[name], errors="coerce").to_numpy(float)

    return column("rtn_dl", math.nan), column("rtn_dl_se", 0.0)


def fit_rtn_prior(df: pd.DataFrame, tau_floor: float = PRIOR_TAU_FLOOR) -> tuple[float, float] | None:
    """(c, tau) of the prior RTN loss ~ N(c * SO, (tau * c * SO)^2) given the second-order estimate SO,
    by maximum likelihood of the ``rtn_loss`` measurements, ``rtn_dl ~ N(c * SO, se^2 + (tau * c * SO)^2)``,
    over the distinct (model, format) measurements in ``df`` (tau >= ``tau_floor``); None with fewer than
    MIN_MEASURED_RUNS."""
    from scipy import optimize

    x, se = rtn_measurement(df)
    u = pd.DataFrame({"log_so": pd.to_numeric(df["log_so"], errors="coerce").to_numpy(float), "x": x, "se": se}
                     ).drop_duplicates()  # one row per (model, format)
    x, se, so = u["x"].to_numpy(), u["se"].to_numpy(), np.exp(u["log_so"].to_numpy())
    ok = np.isfinite(x) & np.isfinite(se) & np.isfinite(so) & (se >= 0)
    if ok.sum() < MIN_MEASURED_RUNS:
        return None
    x, se, so = x[ok], se[ok], so[ok]

    def nll(q):
        c, tau = np.exp(q)
        v = se ** 2 + (tau * c * so) ** 2 + 1e-300
        return 0.5 * float(np.sum(np.log(v) + (x - c * so) ** 2 / v))

    q = optimize.minimize(nll, [0.0, math.log(0.5)], method="Nelder-Mead",
                          options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 4000}).x
    return float(math.exp(q[0])), max(float(math.exp(q[1])), tau_floor)


def calibrated_rtn_loss(df: pd.DataFrame, prior: tuple[float, float]) -> np.ndarray:
    """E[RTN dL | measurement, second order]: regression calibration of the ``rtn_loss`` measurement.

    The posterior mean under the prior ``N(c SO, (tau c SO)^2)`` and the measurement ``N(D, se^2)``:
    ``w * rtn_dl + (1 - w) * c * SO`` with ``w = (tau c SO)^2 / ((tau c SO)^2 + se^2)``. A precise
    measurement (3-bit RTN on a real LLM) stands as measured; one lost in its noise (8 bits on a flat
    toy) gives way to the second-order estimate; rows without the probe take ``c * SO``.
    """
    c, tau = prior
    m = c * np.exp(df["log_so"].to_numpy(float))
    x, se = rtn_measurement(df)
    ok = np.isfinite(x) & np.isfinite(se) & (se >= 0)
    vp = (tau * m) ** 2
    w = np.where(ok, vp / (vp + np.where(ok, se, 1.0) ** 2 + 1e-300), 0.0)
    return np.where(ok, w * np.where(ok, x, 0.0) + (1 - w) * m, m)


def physics_term(df: pd.DataFrame, rtn_prior: tuple[float, float] | None) -> np.ndarray:
    """The physics term R per row (nats): the calibrated RTN loss; NaN on rows that take the second-order
    fallback (below DL_FLOOR, where a loss is unmeasurable, or for a predictor fitted without ``rtn_loss``,
    ``rtn_prior`` None)."""
    rtn = np.full(len(df), math.nan)
    if rtn_prior is None:
        return rtn
    r = calibrated_rtn_loss(df, rtn_prior)
    ok = r > DL_FLOOR
    rtn[ok] = r[ok]
    return rtn


def scale_terms(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The CLIPPED correction terms, unclipped."""
    return {"log_params": df["log_params"].to_numpy(float), "baseline_nll": df["baseline_nll"].to_numpy(float),
            "hinge_noise_over_knee": np.maximum(0.0, np.log(np.maximum(df["noise_over_knee"].to_numpy(float), 1e-12)))}


def design_matrix(df: pd.DataFrame, rtn_prior: tuple[float, float] | None,
                  ranges: dict[str, list[float]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, offset, measured): rows of the formula's terms (``TERMS``), its fixed part (log R on measured
    rows), and which rows are measured. ``ranges``: {term: [lo, hi]} to clip the CLIPPED terms to (a fitted
    predictor's ``ranges_``)."""
    rtn = physics_term(df, rtn_prior)
    meas = np.isfinite(rtn)
    log_rtn = np.where(meas, np.log(np.where(meas, rtn, 1.0)), 0.0)
    m, fb = meas.astype(float), (~meas).astype(float)
    cols = [m, fb, fb * df["log_so"].to_numpy(float)]
    for method in METHODS[1:]:  # rtn is the reference level
        is_m = (df["method"] == method).to_numpy(float)
        cols += [is_m, is_m * df["bits"].to_numpy(float)]
    scale = scale_terms(df)
    for name in CLIPPED:
        if ranges and name in ranges:
            scale[name] = np.clip(scale[name], *ranges[name])
        cols.append(scale[name] * fb if name == "hinge_noise_over_knee" else scale[name])
    return np.column_stack(cols), log_rtn, meas


def log_target(dl: pd.Series | np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(dl, float), DL_FLOOR))


def check_runs(df: pd.DataFrame, required: tuple[str, ...] = REQUIRED_COLUMNS + ("dl",)) -> None:
    """Refuse fitting data with missing columns, NaN values or unknown methods, naming the rows."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise PredictorError(f"runs are missing columns {missing}; required: {list(required)}")
    problems = []
    for c in required:
        if c == "method":
            continue
        bad = df.index[~np.isfinite(pd.to_numeric(df[c], errors="coerce").to_numpy(float))].tolist()
        if bad:
            problems.append(f"column {c!r} is NaN/non-numeric in rows {bad[:20]}{' ...' if len(bad) > 20 else ''}")
    unknown = df.index[~df["method"].isin(METHODS)].tolist()
    if unknown:
        problems.append(f"unknown method in rows {unknown[:20]} (known: {', '.join(METHODS)})")
    if problems:
        raise PredictorError("; ".join(problems))


def _mean_and_variance(A: np.ndarray, beta: np.ndarray, s2: float, k2: float, off: np.ndarray | float = 0.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The noise model's (D, v): median dL D = exp(off + A beta) and the variance v = s2 D^2 + k2 D of the
    measured dL (s2 = sigma_r^2, k2 = kappa^2)."""
    D = np.exp(np.clip(off + A @ beta, -50.0, 10.0))
    return D, s2 * D ** 2 + k2 * D + 1e-14


def joint_mle(A: np.ndarray, y: np.ndarray, beta0: np.ndarray, sr0: float, kappa0: float,
              off: np.ndarray | float = 0.0) -> tuple[np.ndarray, float, float]:
    """Maximize the likelihood of y ~ N(D, sr^2 D^2 + kappa^2 D), D = exp(off + A beta), over (beta, sr, kappa).

    L-BFGS-B with the analytic gradient, run to convergence (the likelihood is flat along some directions of
    beta, so loose tolerances leave the answer dependent on the start); sr >= SIGMA_FLOOR, kappa >= KAPPA_FLOOR.
    """
    from scipy import optimize

    p = A.shape[1]

    def f(x):
        s2, k2 = math.exp(2 * x[p]), math.exp(2 * x[p + 1])
        D, v = _mean_and_variance(A, x[:p], s2, k2, off)
        r = y - D
        g_v = 0.5 * (1.0 / v - r ** 2 / v ** 2)  # d nll / d v
        g_D = g_v * (2 * s2 * D + k2) - r / v  # d nll / d D
        grad = np.concatenate([A.T @ (g_D * D), [np.sum(g_v * 2 * s2 * D ** 2), np.sum(g_v * 2 * k2 * D)]])
        return 0.5 * float(np.sum(np.log(v) + r ** 2 / v)), grad

    bounds = [(None, None)] * p + [(math.log(SIGMA_FLOOR), math.log(10.0)), (math.log(KAPPA_FLOOR), math.log(10.0))]
    x0 = np.concatenate([beta0, [math.log(max(sr0, SIGMA_FLOOR)), math.log(max(kappa0, KAPPA_FLOOR))]])
    x = optimize.minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": 20000, "maxcor": 50, "ftol": 1e-15, "gtol": 1e-10}).x
    return x[:p], float(math.exp(x[p])), float(math.exp(x[p + 1]))


def _conformal_quantile(sorted_scores: np.ndarray, alpha: float) -> float:
    """The finite-sample-corrected (1 - alpha) quantile of sorted conformity scores (split conformal)."""
    n = len(sorted_scores)
    k = min(n - 1, max(0, int(math.ceil((n + 1) * (1 - alpha))) - 1))
    return float(max(sorted_scores[k], 1e-3))


def _rank_message(names: list[str], used: np.ndarray, A: np.ndarray, n_runs: int) -> str:
    """Which terms the runs cannot tell apart (the null space of the design matrix), as a user reads it."""
    _, s, vt = np.linalg.svd(A, full_matrices=False)
    null = vt[s <= s.max() * max(A.shape) * np.finfo(float).eps] if len(s) else vt
    tied = sorted({names[used[j]] for row in null for j in np.flatnonzero(np.abs(row) > 1e-6)})
    what = f"terms {', '.join(tied)} are not separable on these runs" if tied else f"only {n_runs} runs"
    return (f"cannot fit the predictor: {what} (runs of too few models, sizes or formats); add runs of other "
            "models, or fit together with the shipped runs (`advisor fit --with-shipped`)")


@dataclass
class Predictor:
    """The log-space model of the module docstring, with its noise model and conformal intervals.

    Follows the scikit-learn estimator contract (no settings: this is the one design). Fitted attributes
    end in ``_``: ``coef_`` (one per ``TERMS``), ``cov_``, ``resid_std_`` (sigma_r), ``df_resid_``,
    ``noise_kappa_`` (sqrt-nats), ``rtn_prior_`` ((c, tau), None without ``rtn_loss`` runs),
    ``use_measured_``, ``ranges_``, ``method_range_``, ``conformal_`` (the calibrated multiplier ``s`` per
    nominal coverage, e.g. ``{"0.90": 1.9}``), ``conformal_scores_``, ``n_train_``.
    """

    method_guard = True  # a class constant: the interval of an extrapolated method gain reaches RTN's

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {}

    def set_params(self, **params: Any) -> "Predictor":
        for k, v in params.items():
            setattr(self, k, v)
        return self

    # the formula, as the fit and the predictions read it (one place)
    def terms(self) -> list[str]:
        return list(TERMS)

    def _fit_prior(self, X: pd.DataFrame) -> tuple[tuple[float, float] | None, bool]:
        prior = fit_rtn_prior(X)
        return prior, prior is not None

    def physics(self, X: pd.DataFrame) -> np.ndarray:
        """The physics term R per row (nats; NaN where the second-order fallback stands in)."""
        return physics_term(X, self.rtn_prior_ if self.use_measured_ else None)

    def _matrix(self, X: pd.DataFrame, ranges: dict[str, list[float]] | None) -> tuple[np.ndarray, ...]:
        return design_matrix(X, self.rtn_prior_ if self.use_measured_ else None, ranges)

    def _clip_rows(self, raw: dict[str, np.ndarray], meas: np.ndarray, name: str) -> np.ndarray:
        """The fitted runs a CLIPPED term's range is taken over: those it applies to."""
        return raw[name][~meas] if name == "hinge_noise_over_knee" and (~meas).any() else raw[name]

    def fit(self, X: pd.DataFrame, y: np.ndarray | pd.Series | None = None) -> "Predictor":
        """Fit on feature rows ``X`` (columns REQUIRED_COLUMNS) and measured dL ``y`` (or ``X['dl']``).

        The RTN prior, then the joint maximum-likelihood estimate of the coefficients and the noise model
        (module docstring), started from least squares in log space. A term that is zero on every run (a
        method absent from the data, the measured terms without ``rtn_loss`` runs) gets coefficient 0;
        any other linear dependence between terms is refused, naming them.
        """
        X = X.reset_index(drop=True)
        y = np.asarray(X["dl"] if y is None else y, float)
        check_runs(X.assign(dl=y))
        self.rtn_prior_, self.use_measured_ = self._fit_prior(X)
        A, off, meas = self._matrix(X, None)
        t = log_target(y) - off  # the fixed part (log R on measured rows) moves to the left-hand side
        raw = scale_terms(X)
        self.ranges_ = {n: [float(v.min()), float(v.max())] for n in CLIPPED for v in [self._clip_rows(raw, meas, n)]}
        r_fit = self.physics(X)  # each method's range of R over its fitted runs (the guard on extrapolation)
        self.method_range_ = {}
        for method in METHODS[1:]:
            rm = r_fit[(X["method"] == method).to_numpy() & np.isfinite(r_fit)]
            if len(rm):
                self.method_range_[method] = [float(rm.min()), float(rm.max())]
        used = np.flatnonzero(A.any(axis=0))
        Au = A[:, used]
        rank = int(np.linalg.matrix_rank(Au))
        if rank < len(used) or len(t) <= rank:
            raise PredictorError(_rank_message(self.terms(), used, Au, len(t)))
        beta0 = np.linalg.lstsq(Au, t, rcond=None)[0]
        resid = t - Au @ beta0
        beta, sr, kappa = joint_mle(Au, y, beta0, math.sqrt(resid @ resid / (len(t) - rank)), 0.01, off)
        D, v = _mean_and_variance(Au, beta, sr ** 2, kappa ** 2, off)
        self.coef_ = np.zeros(A.shape[1])
        self.coef_[used] = beta
        # parameter covariance: inverse Fisher information of beta, sum_i D_i^2 a_i a_i^T / v_i
        self.cov_ = np.zeros((A.shape[1], A.shape[1]))
        self.cov_[np.ix_(used, used)] = np.linalg.inv(Au.T @ (Au * (D ** 2 / v)[:, None]))
        self.cov_ = (self.cov_ + self.cov_.T) / 2
        self.noise_kappa_, self.resid_std_ = kappa, sr
        self.df_resid_ = float(len(t) - rank)
        self.n_train_ = int(len(t))
        self.conformal_ = {}
        self.conformal_scores_ = np.empty(0)  # set by calibrate()
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise PredictorError("the predictor is not fitted; call fit() or load a predictor file")

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Point prediction of dL (nats): the median of the log-space model."""
        self._check_fitted()
        A, off, _ = self._matrix(X, self.ranges_)
        return np.exp(off + A @ self.coef_)

    def _parts(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(D, sigma_log): point prediction and the log-space prediction sd (residual + parameter)."""
        A, off, _ = self._matrix(X, self.ranges_)
        var = self.resid_std_ ** 2 + np.einsum("ij,jk,ik->i", A, self.cov_, A)
        return np.exp(off + A @ self.coef_), np.sqrt(var)

    def extrapolated_methods(self, X: pd.DataFrame) -> np.ndarray:
        """Boolean per row: a method (not RTN) whose physics term R is beyond the largest R of that method's
        fitted runs, so its gain over RTN is an extrapolation (the interval then reaches up to RTN's prediction); all False for a predictor file that records no method ranges.

        On the shipped zoo the method runs reach R = 0.03 nats at 3-4 bits and 0.3 at 2 bits; a real LLM's
        4-bit RTN loss is 0.2-0.7 nats and its 2-bit one 9-13 (the model collapses, whatever the solver)."""
        if self.method_range_ is None:
            return np.zeros(len(X), bool)
        r = self.physics(X)
        top = X["method"].map(lambda m: self.method_range_.get(m, [math.inf, -math.inf])[1]).to_numpy(float)
        with np.errstate(invalid="ignore"):
            return (X["method"] != "rtn").to_numpy() & np.isfinite(r) & (r > top)

    def estimated_physics(self, X: pd.DataFrame) -> np.ndarray:
        """Boolean per row: the physics term is the second-order estimate, not a measured RTN loss (the
        ``rtn_loss`` probe did not run for the row's format, or this predictor was fitted without it).
        A measured loss below ``DL_FLOOR`` is a measurement: the fallback only sets its scale."""
        self._check_fitted()
        x, _ = rtn_measurement(X)
        return ~np.isfinite(x) | (not self.use_measured_)

    def predictive_variance(self, X: pd.DataFrame) -> np.ndarray:
        """Variance of each row's prediction of dL (nats^2): the log-space sd taken to dL, plus the
        first-order term of random sign (``(D sigma_log)^2 + kappa^2 D``)."""
        self._check_fitted()
        D, sl = self._parts(X)
        return (D * sl) ** 2 + self.noise_kappa_ ** 2 * D

    def outside_fitted_range(self, X: pd.DataFrame) -> dict[str, dict[str, Any]]:
        """The model's scale terms (``log_params``, ``baseline_nll``: the same on every row of one model)
        outside the range this predictor was fitted on: ``{term: {"value", "fitted": [lo, hi]}}``, empty when
        inside. There the correction terms are held at the range's edge and the measured physics term carries
        the model's scale; the held-out check of that is the transfer report (``advisor fit --report``)."""
        out: dict[str, dict[str, Any]] = {}
        for term in ("log_params", "baseline_nll"):
            if term not in self.ranges_ or term not in X or not len(X):
                continue
            value, (lo, hi) = float(X[term].iloc[0]), self.ranges_[term]
            if not lo <= value <= hi:
                out[term] = {"value": value, "fitted": [lo, hi]}
        return out

    def _interval_parts(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(D, sigma_log, floor_up): the row's point prediction and log-space sd, and the least upper bound:
        on rows whose method gain is extrapolated, RTN's point prediction at the same format (elsewhere -inf)."""
        D, sl = self._parts(X)
        guarded = self.extrapolated_methods(X) if self.method_guard else np.zeros(len(X), bool)
        floor_up = np.full(len(X), -math.inf)
        if guarded.any():
            floor_up[guarded] = self.predict(X[guarded].assign(method="rtn"))
        return D, sl, floor_up

    def _guarded_bounds(self, parts: tuple[np.ndarray, ...], s) -> tuple[np.ndarray, np.ndarray]:
        """The interval at multiplier ``s``. Where a method's gain over RTN is extrapolated, its gain lies
        somewhere between the fitted one and none: the interval reaches up to at least RTN's prediction
        ("no gain" is not excluded). Monotone in ``s``, as conformal scoring needs."""
        D, sl, floor_up = parts
        lo, up = self._bounds(D, sl, self.noise_kappa_, s)
        return lo, np.maximum(up, floor_up)

    def _multiplier(self, alpha: float) -> float:
        from scipy import stats

        rs = self.conformal_scores_
        if len(rs):  # calibrated at any coverage: the conformal quantile of the scores
            return _conformal_quantile(rs, alpha)
        key = f"{1 - alpha:.2f}"
        return float(self.conformal_[key]) if key in self.conformal_ else float(stats.t.ppf(1 - alpha / 2, self.df_resid_))

    @staticmethod
    def _bounds(D: np.ndarray, sigma_log: np.ndarray, kappa: float, s) -> tuple[np.ndarray, np.ndarray]:
        e = np.exp(np.minimum(s * sigma_log, 700.0))
        noise = s * kappa * np.sqrt(D)
        return D / e - noise, D * e + noise

    def predict_interval(self, X: pd.DataFrame, alpha: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, lower, upper) of dL at coverage 1 - alpha; bounds are calibrated when ``calibrate`` ran.

        The lower bound may be negative: within the measurement noise, a quantized model can score better.
        """
        self._check_fitted()
        parts = self._interval_parts(X)
        lo, up = self._guarded_bounds(parts, self._multiplier(alpha))
        return parts[0], lo, up

    def scores(self, X: pd.DataFrame) -> np.ndarray:
        """Conformity score of each run: the smallest multiplier ``s`` whose interval contains its dL."""
        self._check_fitted()
        y = np.asarray(X["dl"], float)
        parts = self._interval_parts(X)
        lo, hi = np.zeros(len(y)), np.full(len(y), 1.0)
        while True:  # grow the bracket until every run is inside
            l, u = self._guarded_bounds(parts, hi)
            out = ~((y >= l) & (y <= u))
            if not out.any() or hi.max() > 1e4:
                break
            hi = np.where(out, hi * 4, hi)
        for _ in range(50):  # bisection: the interval grows monotonically with s
            mid = (lo + hi) / 2
            l, u = self._guarded_bounds(parts, mid)
            inside = (y >= l) & (y <= u)
            hi, lo = np.where(inside, mid, hi), np.where(inside, lo, mid)
        return hi

    def calibrate(self, X: pd.DataFrame, groups: np.ndarray, alphas: tuple[float, ...] = (0.1, 0.2, 0.05)) -> "Predictor":
        """Split-conformal on grouped CV: the multiplier ``s`` so held-out coverage is nominal.

        For each held-out group, refit on the rest and record each held-out run's score (the smallest
        ``s`` whose interval contains it); the multiplier is the finite-sample-corrected (1 - alpha)
        quantile of those scores.
        """
        X = X.reset_index(drop=True)
        groups = np.asarray(groups)
        scores: list[float] = []
        for g in np.unique(groups):
            train, test = X[groups != g], X[groups == g]
            if len(train) < 10 or not len(test):
                continue
            scores += list(type(self)(**self.get_params()).fit(train).scores(test))
        rs = np.sort(np.asarray(scores, float))
        self.conformal_scores_ = rs  # kept, so that every coverage (e.g. recommend's 0.7) is calibrated
        for a in alphas:
            if len(rs):
                self.conformal_[f"{1 - a:.2f}"] = _conformal_quantile(rs, a)
        return self

    # -- persistence: JSON only ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"format_version": FORMAT_VERSION, "kind": "advisor.Predictor", "design": self.terms(),
                "design_options": dict(DESIGN_OPTIONS),
                "coef": self.coef_.tolist(), "cov": self.cov_.tolist(),
                "resid_std": self.resid_std_, "df_resid": self.df_resid_, "n_train": self.n_train_,
                "noise_kappa": self.noise_kappa_, "ranges": self.ranges_, "method_range": self.method_range_,
                "additive_noise": True, "use_measured": self.use_measured_,
                "rtn_prior": None if self.rtn_prior_ is None else list(self.rtn_prior_),
                "conformal": self.conformal_, "dl_floor": DL_FLOOR,
                "conformal_scores": [float(v) for v in self.conformal_scores_]}

    def describe(self) -> dict[str, Any]:
        """What identifies this predictor in a report: source, format, design options and training size."""
        self._check_fitted()
        return {"source": getattr(self, "source_", "fitted in this process"), "format_version": FORMAT_VERSION,
                "design_options": {**DESIGN_OPTIONS, "method_guard": self.method_guard}, "n_train": self.n_train_}

    def save(self, path: str | Path) -> Path:
        from advisor.models.saving import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False))

    @classmethod
    def from_dict(cls, d: Any, where: str = "predictor file") -> "Predictor":
        """A fitted predictor from its JSON record, validated: the schema of ``to_dict``, finite numbers, a
        symmetric covariance, positive noise scales. Raises PredictorError naming the first bad field."""
        def bad(what: str) -> PredictorError:
            return PredictorError(f"{where}: {what}; {REFIT}")

        if not isinstance(d, dict) or d.get("kind") != "advisor.Predictor":
            raise PredictorError(f"{where} is not an advisor predictor file (no \"kind\": \"advisor.Predictor\")")
        options = d.get("design_options", DESIGN_OPTIONS)
        if (d.get("format_version") != FORMAT_VERSION or d.get("design") != list(TERMS)
                or not isinstance(options, dict) or {**DESIGN_OPTIONS, **options} != DESIGN_OPTIONS
                or d.get("additive_noise", True) is not True):
            design = d.get("design")
            n_terms = len(design) if isinstance(design, list) else "no list of"
            raise PredictorError(f"{where} (format {d.get('format_version')}, {n_terms} terms) "
                                 f"is incompatible with this advisor (format {FORMAT_VERSION}, the design of "
                                 f"docs/predictor.md); {REFIT}")
        p = len(TERMS)

        def number(key: str, lo: float = -math.inf, low_open: bool = False, value: Any = None) -> float:
            v = d.get(key) if value is None else value
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or (low_open and v == lo):
                raise bad(f"{key!r} must be a finite number{f' above {lo:g}' if low_open else ''}"
                          f"{f' >= {lo:g}' if lo > -math.inf and not low_open else ''}, got {v!r}")
            return float(v)

        def array(key: str, shape: tuple[int, ...]) -> np.ndarray:
            try:
                a = np.asarray(d.get(key), float)
            except (TypeError, ValueError):
                raise bad(f"{key!r} must be numbers of shape {shape}") from None
            if a.shape != shape or not np.isfinite(a).all():
                raise bad(f"{key!r} must be finite numbers of shape {shape}, got shape {a.shape}"
                          + ("" if a.shape != shape else " with NaN or infinite values"))
            return a

        def pairs(key: str, value: Any) -> dict[str, list[float]]:
            if not isinstance(value, dict):
                raise bad(f"{key!r} must be an object of [low, high] pairs")
            out = {}
            for k, v in value.items():
                if not isinstance(v, (list, tuple)) or len(v) != 2:
                    raise bad(f"{key!r}[{k!r}] must be a [low, high] pair")
                lo, hi = (number(f"{key}[{k}]", value=x) for x in v)
                if lo > hi:
                    raise bad(f"{key!r}[{k!r}] has low {lo} above high {hi}")
                out[str(k)] = [lo, hi]
            return out

        pred = cls()
        pred.coef_ = array("coef", (p,))
        pred.cov_ = array("cov", (p, p))
        if not np.allclose(pred.cov_, pred.cov_.T, rtol=1e-6, atol=1e-12) or (np.diag(pred.cov_) < 0).any():
            raise bad("'cov' must be a symmetric covariance with a non-negative diagonal")
        pred.resid_std_ = number("resid_std", 0.0, low_open=True)
        pred.noise_kappa_ = number("noise_kappa", 0.0)
        pred.df_resid_ = number("df_resid", 0.0, low_open=True)
        n = d.get("n_train")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad(f"'n_train' must be a positive integer, got {n!r}")
        pred.n_train_ = n
        if not isinstance(d.get("use_measured"), bool):
            raise bad("'use_measured' must be true or false")
        pred.use_measured_ = d["use_measured"]
        prior = d.get("rtn_prior")
        if prior is None:
            if pred.use_measured_:
                raise bad("'rtn_prior' is missing but 'use_measured' is true")
            pred.rtn_prior_ = None
        elif not isinstance(prior, (list, tuple)) or len(prior) != 2:
            raise bad("'rtn_prior' must be [c, tau]")
        else:
            pred.rtn_prior_ = (number("rtn_prior c", 0.0, True, prior[0]), number("rtn_prior tau", 0.0, True, prior[1]))
        pred.ranges_ = pairs("ranges", d.get("ranges"))
        if set(pred.ranges_) != set(CLIPPED):
            raise bad(f"'ranges' must give {', '.join(CLIPPED)}")
        ranges = d.get("method_range")
        pred.method_range_ = None if ranges is None else pairs("method_range", ranges)
        conformal = d.get("conformal", {})
        if not isinstance(conformal, dict):
            raise bad("'conformal' must be an object {coverage: multiplier}")
        pred.conformal_ = {str(k): number(f"conformal[{k}]", 0.0, True, v) for k, v in conformal.items()}
        raw = d.get("conformal_scores")
        if raw is not None and not isinstance(raw, list):
            raise bad("'conformal_scores' must be a list of numbers")
        scores = array("conformal_scores", (len(raw),)) if raw else np.empty(0)
        if (scores < 0).any():
            raise bad("'conformal_scores' must be non-negative")
        pred.conformal_scores_ = np.sort(scores)
        return pred

    @classmethod
    def load(cls, path: str | Path) -> "Predictor":
        path = Path(path)
        try:
            d = json.loads(path.read_text())  # NaN / Infinity literals parse, and validation names their field
        except (OSError, UnicodeDecodeError) as e:
            raise PredictorError(f"predictor file {path} cannot be read ({e})") from None
        except ValueError as e:
            raise PredictorError(f"predictor file {path} is not valid JSON ({e}); {REFIT}") from None
        p = cls.from_dict(d, where=f"predictor file {path}")
        p.source_ = str(path)
        return p


# -- the published-approach baseline ------------------------------------------------------------------
def forest_matrix(df: pd.DataFrame) -> np.ndarray:
    cols = {
        "log_params": df["log_params"], "baseline_nll": df["baseline_nll"], "sqnr_db": df["sqnr_db"],
        "bits": df["bits"], "group_log2": np.log2(df["group_size"].fillna(4096).astype(float)),
        "is_int": df["dtype_family"].eq("int"), "is_fp": df["dtype_family"].eq("fp"),
        "is_nf": df["dtype_family"].eq("nf"), "is_mx": df["dtype_family"].eq("mx"),
    }
    for m in METHODS:
        cols[f"m_{m}"] = df["method"].eq(m)
    return np.column_stack([np.asarray(cols[k], float) for k in FOREST_FEATURES])


def fit_forest(df: pd.DataFrame, seed: int = 0):
    """Random forest on the published feature set (Xu et al.): params, baseline NLL, RTN SQNR, format."""
    from sklearn.ensemble import RandomForestRegressor

    rf = RandomForestRegressor(n_estimators=300, min_samples_leaf=2, random_state=seed, n_jobs=1)
    return rf.fit(forest_matrix(df), np.asarray(df["dl"], float))


# -- evaluation ----------------------------------------------------------------------------------------
def error_report(measured_dl: np.ndarray, pred_dl: np.ndarray, lower: np.ndarray | None = None,
                 upper: np.ndarray | None = None, baseline_ppl: np.ndarray | None = None) -> dict[str, Any]:
    from scipy.stats import spearmanr

    measured_dl, pred_dl = np.asarray(measured_dl, float), np.asarray(pred_dl, float)
    abs_err = np.abs(pred_dl - measured_dl)
    rel = abs_err / np.maximum(np.abs(measured_dl), DL_FLOOR)
    out: dict[str, Any] = {
        "n_runs": int(len(measured_dl)),
        "median_abs_err_dl": float(np.median(abs_err)) if len(abs_err) else None,
        "median_rel_err_dl": float(np.median(rel)) if len(rel) else None,
        "spearman": float(spearmanr(measured_dl, pred_dl).statistic) if len(measured_dl) > 2 else None,
    }
    # the target, run by run: |err| <= max(0.02 nats, 15% of the measured dL)
    target = np.maximum(TARGET_ABS_DL, TARGET_REL_DL * np.abs(measured_dl))
    out["median_err_over_target"] = float(np.median(abs_err / target)) if len(abs_err) else None
    out["within_target"] = float(np.mean(abs_err <= target)) if len(abs_err) else None
    if baseline_ppl is not None:
        bp = np.asarray(baseline_ppl, float)
        out["median_abs_err_dppl"] = float(np.median(np.abs(bp * (np.exp(pred_dl) - np.exp(measured_dl)))))
    if lower is not None and upper is not None:
        lower, upper = np.asarray(lower, float), np.asarray(upper, float)
        eps = 1e-12 + 1e-9 * np.abs(measured_dl)
        out["coverage90"] = float(np.mean((measured_dl >= lower - eps) & (measured_dl <= upper + eps)))
        out["median_interval_width_dl"] = float(np.median(upper - lower))
    return out


def leave_one_group_out(df: pd.DataFrame, group_col: str = "family", alpha: float = 0.1,
                        with_forest: bool = True, make=None) -> dict[str, Any]:
    """Hold out each group in turn (refit + calibrate on the rest); pooled held-out error report.

    ``make``: builds the unfitted estimator (default ``Predictor``; benchmarks pass their variants)."""
    make = make or Predictor
    preds, lows, ups, forest_preds, idx = [], [], [], [], []
    groups = df[group_col].to_numpy()
    for g in np.unique(groups):
        train, test = df[groups != g], df[groups == g]
        if len(train) < 10 or not len(test):
            continue
        p = make().fit(train).calibrate(train, train[group_col].to_numpy())
        mean, lo, up = p.predict_interval(test, alpha)
        preds.append(mean); lows.append(lo); ups.append(up); idx.append(test.index.to_numpy())
        if with_forest:
            forest_preds.append(fit_forest(train).predict(forest_matrix(test)))
    if not idx:
        raise PredictorError(f"leave-one-{group_col}-out needs at least two {group_col} groups with runs")
    order = np.concatenate(idx)
    held = df.loc[order]
    rep = error_report(held["dl"].to_numpy(), np.concatenate(preds), np.concatenate(lows), np.concatenate(ups),
                       held["baseline_ppl"].to_numpy() if "baseline_ppl" in held else None)
    if with_forest:
        fp = np.concatenate(forest_preds)
        rep["forest_median_abs_err_dl"] = float(np.median(np.abs(fp - held["dl"].to_numpy())))
    rep["n_families"] = int(len(np.unique(held[group_col])))
    return rep
