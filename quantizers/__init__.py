"""quantizers: data types, quantization specs and methods as pure tensor functions.

Registries: ``DTYPES`` / ``get_dtype`` (element formats), ``METHODS`` / ``get_method`` (algorithms).
Every method maps ``(W (out, in), QuantSpec, LayerStats) -> QuantizedWeight``.
"""
from .base import (METHODS, LayerStats, Method, QuantizedWeight, check_finite, get_method, known_methods,
                   layer_error, register)
from .dtypes import DTYPES, DataType, get_dtype
from .spec import Option, QuantSpec
from . import rtn, gptq, awq, quantease, quantease_outlier, nonuniform  # noqa: E402,F401  (registration)

__all__ = [
    "DTYPES", "DataType", "get_dtype", "QuantSpec", "Option", "LayerStats", "QuantizedWeight", "Method",
    "METHODS", "get_method", "known_methods", "register", "layer_error", "check_finite",
]
