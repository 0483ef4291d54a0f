"""Predictor rows: one model's probe features crossed with candidate specs.

Columns (what the predictor and its forest baseline read):
- ``log_so``: natural log of the ``second_order`` probe estimate 1/2 sum F_ii e_i^2 for RTN at the spec's
  data type and group size (the physics the model starts from);
- ``sqnr_db``: RTN weight SQNR at that format (the published predictor's key feature);
- ``noise_over_knee``: RTN relative noise 10^(-SQNR/20) over the knee sigma of the radial loss curve
  (``perturbation.all_knee_sigma``), where the step-like rise begins;
- ``method``, ``bits`` (code bits), ``dtype``, ``dtype_family``, ``group_size``: the format;
- ``log_params`` (log10 non-embedding parameters) and ``baseline_nll``: scale;
- ``rtn_dl``, ``rtn_dl_se``: the ``rtn_loss`` probe, the measured NLL increase of round-to-nearest at the
  spec's format on calibration windows, and its standard error (NaN when the probe was not run; the
  predictor then falls back to ``log_so``).
"""
from __future__ import annotations

import math
from typing import Mapping

import pandas as pd

from advisor.models.errors import AdvisorError

KNEE_KEY = "perturbation.all_knee_sigma"
LANDSCAPE_PROBES = ("hessian", "fisher", "perturbation", "outliers", "sqnr", "second_order")
PROBE_SETTINGS = {"second_order": {"all_group_sizes": True}}
# The formats of the default candidate grid (``probes.feature_key`` of ``candidates.DEFAULT_SPECS``; a
# test keeps the two in step), measured by ``rtn_loss`` on up to 8 calibration windows.
RTN_LOSS_KEYS = ("int8_pc", "fp8_e4m3_pc", "fp8_e5m2_pc", "mxint8", "mxfp8_e4m3", "fp6_e3m2_pc", "fp6_e2m3_pc",
                 "mxfp6_e3m2", "mxfp6_e2m3", "int4_g128", "int4_g64", "int4_g32", "int4_pc", "nf4_g64",
                 "fp4_e2m1_g128", "mxfp4", "mxint4", "int3_g128", "int3_g64", "nf3_g64", "int3_pc", "int2_g64",
                 "int2_g32")
# At most 8 windows; a format stops once its standard error is 10% of its loss increase or 5e-4 nats
# (0.05% perplexity: far below any budget) (probes.rtn_loss)
RTN_LOSS_SETTINGS = {"rtn_loss": {"keys": list(RTN_LOSS_KEYS), "n_windows": 8, "target_rel_se": 0.1,
                                  "target_abs_se": 5e-4}}


def spec_row(features: Mapping[str, float], spec: str, non_embedding_params: int, baseline_nll: float) -> dict:
    from advisor.probes import feature_key
    from advisor.quantizers import QuantSpec, get_dtype

    qs = QuantSpec.parse(spec)
    dt = get_dtype(qs.dtype)
    key = feature_key(qs)
    try:
        so = float(features[f"second_order.{key}"])
        sqnr_db = float(features[f"sqnr.{key}_db"])
        knee = float(features[KNEE_KEY])
    except KeyError as e:
        raise AdvisorError(f"probe features lack {e.args[0]!r} needed for spec {spec}; rerun the probes with "
                           f"settings {PROBE_SETTINGS} (advisor probe --no-cache)") from None
    rel_noise = 10 ** (-sqnr_db / 20)
    rtn_dl = features.get(f"rtn_loss.{key}", math.nan)
    rtn_se = features.get(f"rtn_loss.{key}_se", math.nan)
    return {"spec": str(qs), "method": qs.method, "dtype": qs.dtype, "dtype_family": dt.family, "bits": dt.bits,
            "group_size": qs.group_size if qs.group_size else (dt.block_size or None),
            "log_so": math.log(max(so, 1e-30)), "sqnr_db": sqnr_db,
            "noise_over_knee": rel_noise / max(knee, 1e-9), "knee_sigma": knee,
            "log_params": math.log10(max(non_embedding_params, 1)), "baseline_nll": baseline_nll,
            "rtn_dl": float(rtn_dl), "rtn_dl_se": float(rtn_se)}


def feature_rows(features: Mapping[str, float], specs: list[str], non_embedding_params: int,
                 baseline_nll: float) -> pd.DataFrame:
    """One row per spec (see module docstring)."""
    return pd.DataFrame([spec_row(features, s, non_embedding_params, baseline_nll) for s in specs])
