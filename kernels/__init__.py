"""kernels: packed low-bit storage and fast dequant-matmul (bottom layer: torch, numpy, numba only).

Public API (see docs/INTERFACES.md and docs/kernels.md):
``pack_linear``, ``QuantLinear``, ``save_quantized``, ``load_quantized``, ``export_gptq``,
``read_gptq``.
"""
from .linear import QuantLinear, pack_linear

__all__ = ["QuantLinear", "pack_linear", "save_quantized", "load_quantized", "export_gptq",
           "read_gptq"]


def __getattr__(name):  # lazy: keep `import kernels` cheap (no safetensors until needed)
    if name in ("save_quantized", "load_quantized"):
        from . import io

        return getattr(io, name)
    if name in ("export_gptq", "read_gptq"):
        from . import gptq_format

        return getattr(gptq_format, name)
    raise AttributeError(name)
