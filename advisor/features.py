"""Predictor rows: one model's probe features crossed with candidate specs.

Columns (what the predictor and its forest baseline read):
- ``log_so``: natural log of the ``second_order`` probe estimate 1/2 sum F_ii e_i^2 for RTN at the spec's
  data type and group size (the physics the model starts from);
- ``sqnr_db``: RTN weight SQNR at that format (the published predictor's key feature);
- ``noise_over_knee``: RTN relative noise 10^(-SQNR/20) over the knee sigma of the radial loss curve
  (``perturbation.all_knee_sigma``), where the step-like rise begins;
- ``method``, ``bits`` (code bits), ``dtype``, ``dtype_family``, ``group_size``: the format;
- ``log_params`` (log10 non-embedding parameters) and ``baseline_nll``: scale.
"""
from __future__ import annotations

import math
from typing import Mapping

import pandas as pd

from models.errors import AdvisorError

KNEE_KEY = "perturbation.all_knee_sigma"
PROBE_SETTINGS = {"second_order": {"all_group_sizes": True}}


def spec_row(features: Mapping[str, float], spec: str, non_embedding_params: int, baseline_nll: float) -> dict:
    from probes import feature_key
    from quantizers import QuantSpec, get_dtype

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
    return {"spec": str(qs), "method": qs.method, "dtype": qs.dtype, "dtype_family": dt.family, "bits": dt.bits,
            "group_size": qs.group_size if qs.group_size else (dt.block_size or None),
            "log_so": math.log(max(so, 1e-30)), "sqnr_db": sqnr_db,
            "noise_over_knee": rel_noise / max(knee, 1e-9), "knee_sigma": knee,
            "log_params": math.log10(max(non_embedding_params, 1)), "baseline_nll": baseline_nll}


def feature_rows(features: Mapping[str, float], specs: list[str], non_embedding_params: int,
                 baseline_nll: float) -> pd.DataFrame:
    """One row per spec (see module docstring)."""
    return pd.DataFrame([spec_row(features, s, non_embedding_params, baseline_nll) for s in specs])
