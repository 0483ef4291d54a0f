"""probes: cheap measurements of a model's local loss landscape (features for the predictor).

``PROBES`` maps name -> probe (each with a one-line ``description``); ``run_probes`` runs several on
one model and calibration set and returns a ``FeatureRecord`` keyed ``"<probe>.<feature>"``.
Order matters only for cost: ``fisher`` and ``sqnr`` before ``second_order`` share their work.
"""
from advisor.probes.base import (DEFAULT_CALIB, DEFAULT_CALIB_SEQ_LEN, DEFAULT_N_CALIB, PROBES, FeatureRecord, Probe,
                         ProbeContext, ProbeResult, get_probe, resolve_all_settings, run_probes)
from advisor.probes import hessian, fisher, perturbation, outliers, sqnr, second_order, rtn_loss  # noqa: E402,F401 (registration)
from advisor.probes._rtn import default_group
from advisor.probes._util import spec_key


def feature_key(spec) -> str:
    """The ``sqnr`` / ``second_order`` feature-key fragment of an RTN-able spec (``QuantSpec`` or string).

    ``rtn:int4:g128 -> int4_g128``, ``rtn:int8 -> int8_pc``, ``gptq:mxfp4 -> mxfp4``,
    ``gptq:int4:g128:asym -> int4_g128_asym`` (the probes measure RTN of that symmetry).
    """
    from advisor.quantizers import QuantSpec, get_dtype

    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    return spec_key(spec.dtype, spec.group_size, get_dtype(spec.dtype).block_size, spec.symmetric)


__all__ = ["PROBES", "Probe", "ProbeResult", "ProbeContext", "FeatureRecord", "run_probes", "get_probe",
           "resolve_all_settings", "feature_key", "default_group", "DEFAULT_CALIB", "DEFAULT_N_CALIB",
           "DEFAULT_CALIB_SEQ_LEN"]
