"""The predictor designs measured against the shipped one, for the benchmarks that replay them.

``advisor.predictor`` holds only the shipped design. These variants (docs/experiments.md says what each
measured and why it was not shipped) refit with the same fitting path, so a benchmark row differs from
the shipped one only by the option it names:

- ``calibrated=False``: the raw ``rtn_loss`` measurement where it is at least ``measured_z`` standard
  errors above 0, else the second-order fallback (format 3);
- ``fixed_slope=False``: a fitted slope on log R (format 3), instead of log dL moving 1:1 with it;
- ``scale_on_measured=False``: the scale corrections on fallback rows only;
- ``prior_tau_floor``: the least relative width of the second-order prior (1.0 was tried);
- ``method_guard=False``: no guard on extrapolated method gains (format 4);
- ``method_log_r=True``: a per-method slope on log R (tried, not shipped).

    from benchmarks._predictor_variants import Variant, variant
    p = variant(method_guard=False)().fit(runs)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from advisor import predictor as P


@dataclass(frozen=True)
class Variant:
    """A form of the log-space model; the defaults are the shipped design (``advisor.predictor``)."""

    calibrated: bool = True
    fixed_slope: bool = True
    scale_on_measured: bool = True
    measured_z: float = 3.0
    prior_tau_floor: float = P.PRIOR_TAU_FLOOR
    method_guard: bool = True
    method_log_r: bool = False

    def fallback_only(self, term: str) -> bool:
        return term == "hinge_noise_over_knee" or not self.scale_on_measured

    def names(self) -> list[str]:
        names = ["measured"] + ([] if self.fixed_slope else ["measured:log_rtn_dl"]) + ["fallback", "fallback:log_so"]
        for m in P.METHODS[1:]:
            names += [f"method[{m}]", f"method[{m}]:bits"]
        pre = "" if self.scale_on_measured else "fallback:"
        names += [f"{pre}log_params", f"{pre}baseline_nll", "fallback:hinge_noise_over_knee"]
        return names + ([f"method[{m}]:log_rtn" for m in P.METHODS[1:]] if self.method_log_r else [])


def measured_physics(df: pd.DataFrame, z: float) -> np.ndarray:
    """Boolean per row: the raw ``rtn_loss`` measurement is usable (present and >= ``z`` standard errors)."""
    dl, se = P.rtn_measurement(df)
    se = np.where(np.isfinite(se), se, 0.0)
    with np.errstate(invalid="ignore"):
        return np.isfinite(dl) & (dl > P.DL_FLOOR) & (dl >= z * se)


@dataclass
class VariantPredictor(P.Predictor):
    """``advisor.predictor.Predictor`` with the formula of a ``Variant``; fit, intervals and calibration are
    the product's."""

    design: Variant = field(default_factory=Variant)

    def get_params(self, deep: bool = True) -> dict:
        return {"design": self.design}

    @property
    def method_guard(self) -> bool:  # type: ignore[override]
        return self.design.method_guard

    def terms(self) -> list[str]:
        return self.design.names()

    def _fit_prior(self, X):
        if self.design.calibrated:
            prior = P.fit_rtn_prior(X, self.design.prior_tau_floor)
            return prior, prior is not None
        return None, bool(measured_physics(X, self.design.measured_z).sum() >= P.MIN_MEASURED_RUNS)

    def physics(self, X: pd.DataFrame) -> np.ndarray:
        if self.design.calibrated:
            return P.physics_term(X, self.rtn_prior_ if self.use_measured_ else None)
        rtn = np.full(len(X), math.nan)
        if self.use_measured_:
            ok = measured_physics(X, self.design.measured_z)
            rtn[ok] = P.rtn_measurement(X)[0][ok]
        return rtn

    def _matrix(self, X: pd.DataFrame, ranges):
        d = self.design
        rtn = self.physics(X)
        meas = np.isfinite(rtn)
        log_rtn = np.where(meas, np.log(np.where(meas, rtn, 1.0)), 0.0)
        m, fb = meas.astype(float), (~meas).astype(float)
        cols = [m] + ([] if d.fixed_slope else [log_rtn]) + [fb, fb * X["log_so"].to_numpy(float)]
        for method in P.METHODS[1:]:
            is_m = (X["method"] == method).to_numpy(float)
            cols += [is_m, is_m * X["bits"].to_numpy(float)]
        scale = P.scale_terms(X)
        for name in P.CLIPPED:
            if ranges and name in ranges:
                scale[name] = np.clip(scale[name], *ranges[name])
            cols.append(scale[name] * fb if d.fallback_only(name) else scale[name])
        if d.method_log_r:  # log_rtn is 0 on fallback rows: there the method terms stay constant
            cols += [(X["method"] == method).to_numpy(float) * log_rtn for method in P.METHODS[1:]]
        offset = log_rtn if d.fixed_slope else np.zeros(len(X))
        return np.column_stack(cols), offset, meas

    def _clip_rows(self, raw, meas, name):
        return raw[name][~meas] if self.design.fallback_only(name) and (~meas).any() else raw[name]

    def describe(self) -> dict:
        return {**super().describe(), "design_options": asdict(self.design)}


def variant(**options) -> type:
    """A zero-argument factory of ``VariantPredictor`` with ``options`` (what ``fitting.fit(make=...)`` and
    ``predictor.leave_one_group_out(make=...)`` take)."""
    design = Variant(**options)
    return lambda: VariantPredictor(design=design)
