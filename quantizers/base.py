"""Core types: calibration statistics, the quantized weight, and the method registry.

A method is a pure function ``fn(W (out, in) float32, spec, stats) -> QuantizedWeight``. ``Method.quantize``
wraps it with input checks (shapes, NaN/Inf, required statistics) so every method reports bad input
the same way, with the layer name when the caller passes one.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .dtypes import DataType
from .grid import GridParams
from .grid import dequantize as _dequantize
from .spec import Option, QuantSpec

__all__ = [
    "LayerStats", "QuantizedWeight", "Method", "METHODS", "register", "get_method", "known_methods",
    "layer_error", "check_finite", "weight_from_grid",
]

STAT_KINDS = frozenset({"hessian", "act_abs_mean"})
ALL_FAMILIES = frozenset({"int", "fp", "nf", "mx"})


@dataclass(eq=False)
class LayerStats:
    """Calibration statistics of one linear layer's input.

    Attributes:
        H: ``(in, in)`` float32, ``sum_t x_t x_t^T`` over calibration tokens (no 2/n factor).
        n_tokens: number of tokens summed into ``H`` / averaged into ``act_abs_mean``.
        act_abs_mean: ``(in,)`` float32, mean ``|x|`` per input channel.
        fisher: optional ``(out, in)`` float32 diagonal Fisher (mean squared gradient) of the weights;
            used by ``nonuniform`` instead of ``diag(H)`` when present.
    """

    H: torch.Tensor | None = None
    n_tokens: int = 0
    act_abs_mean: torch.Tensor | None = None
    fisher: torch.Tensor | None = None


@dataclass(eq=False)
class QuantizedWeight:
    """A quantized ``(out, in)`` weight in the kernels' format.

    ``W[o, i] = table[codes[o, i]] * scales[o, i // group_size] + offsets[o, i // group_size]``
    (+ outliers at their positions), then divided by ``input_scale[i]`` when present (AWQ).

    Attributes:
        codes: ``(out, in)`` uint8, values in ``[0, 2**dtype.bits)``.
        scales: ``(out, ceil(in / group_size))`` float32.
        offsets: same shape as ``scales`` or ``None`` (only asymmetric ints have offsets).
        table: ``(2**bits,)`` float32 shared table or ``(out, 2**bits)`` per-row codebook.
        group_size: columns per scale (per channel: ``in``; MX: 32); the last group may be partial.
        outliers: ``None`` or ``(indices (nnz, 2) long [row, col], values (nnz,) float32)``, fp16-exact values.
        dtype: the element format; spec: the recipe that produced it.
        input_scale: ``None`` or ``(in,)`` float32 per-input-channel scale ``s`` (AWQ); the effective
            weight is ``W / s`` and the packed layer computes ``(x / s) @ W^T``.
        info: diagnostics from the method (chosen alpha, passes, ...), JSON-able.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    table: torch.Tensor
    group_size: int
    outliers: tuple[torch.Tensor, torch.Tensor] | None
    dtype: DataType
    spec: QuantSpec
    input_scale: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The effective weight ``(out, in)`` float32."""
        W = _dequantize(self.codes, self.table, self.scales, self.offsets, self.group_size)
        if self.outliers is not None:
            idx, val = self.outliers
            W = W.index_put((idx[:, 0], idx[:, 1]), val.to(W.dtype), accumulate=True)
        if self.input_scale is not None:
            W = W / self.input_scale[None, :]
        return W

    def pack(self, bias: torch.Tensor | None = None):
        """Pack into an ``advisor.kernels.QuantLinear`` (imported here: the kernels pull in numba).

        Meta passed to ``kernels.pack_linear``: ``spec``, ``dtype``; ``scale_pow2`` for MX (E8M0 scales);
        ``input_scale`` for AWQ; ``scale_dtype="float32"`` when there are offsets, because an offset
        ``-zero_point * scale`` is not fp16-exact (the bits we count are a ``b``-bit integer zero point,
        which the packed layer would need to store to be both exact and that small).
        """
        from advisor.kernels import pack_linear

        meta: dict[str, Any] = {"spec": str(self.spec), "dtype": self.dtype.name}
        if self.dtype.scale_format == "e8m0":
            meta["scale_pow2"] = True
        if self.offsets is not None:
            meta["scale_dtype"] = "float32"
        if self.input_scale is not None:
            meta["input_scale"] = self.input_scale
        return pack_linear(self.codes, self.scales, self.offsets, bits=self.dtype.bits, table=self.table,
                           group_size=self.group_size, outliers=self.outliers, bias=bias, meta=meta)


@dataclass(frozen=True)
class Method:
    """A registered quantization method.

    Attributes:
        name: registry key (the first field of a spec string).
        description: one line.
        requires: statistics it needs, a subset of ``{"hessian", "act_abs_mean"}``.
        fn: ``fn(W, spec, stats) -> QuantizedWeight``; inputs are already checked.
        options: the spec options it takes (order = canonical order in spec strings).
        dtype_families: data type families it supports.
        supports_asymmetric: whether ``asym`` specs are allowed.
        extra_bits: ``(spec, in_features) -> float`` storage overhead beyond codes/scales/zeros.
        validate: ``(spec, dtype) -> None``, raising ``ValueError`` for combinations the method refuses
            (called from ``QuantSpec.__post_init__``).
    """

    name: str
    description: str
    requires: frozenset[str]
    fn: Callable[..., "QuantizedWeight"] = field(repr=False)
    options: tuple[Option, ...] = ()
    dtype_families: frozenset[str] = ALL_FAMILIES
    supports_asymmetric: bool = True
    extra_bits: Callable[[QuantSpec, int | None], float] | None = field(default=None, repr=False)
    validate: Callable[[QuantSpec, DataType], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.requires <= STAT_KINDS:
            raise ValueError(f"{self.name}: requires must be a subset of {sorted(STAT_KINDS)}")

    def quantize(self, weight: torch.Tensor, spec: QuantSpec | str, stats: LayerStats | None = None,
                 name: str | None = None) -> QuantizedWeight:
        """Check inputs and run the method.

        Args:
            weight: ``(out, in)`` float tensor (converted to float32).
            spec: a ``QuantSpec`` (or its string) whose method is this one.
            stats: calibration statistics; must hold what ``requires`` names.
            name: layer name for error messages (e.g. ``model.layers.3.mlp.down_proj``).
        Raises:
            ValueError: wrong shapes, NaN/Inf in the weight or statistics, missing statistics.
        """
        where = f"{name}: " if name else ""
        if isinstance(spec, str):
            spec = QuantSpec.parse(spec)
        if spec.method != self.name:
            raise ValueError(f"{where}spec {spec} is for method {spec.method}, not {self.name}")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{where}weight must be a 2-D tensor (out, in), got "
                             f"{getattr(weight, 'shape', type(weight))}")
        W = weight.detach().to(torch.float32)
        check_finite(W, "weight", name)
        stats = stats if stats is not None else LayerStats()
        in_features = W.shape[1]
        if "hessian" in self.requires and stats.H is None:
            raise ValueError(f"{where}method {self.name} needs the input Hessian H = sum x x^T "
                             f"(LayerStats.H); requires: {sorted(self.requires)}")
        if "act_abs_mean" in self.requires and stats.act_abs_mean is None:
            raise ValueError(f"{where}method {self.name} needs LayerStats.act_abs_mean; "
                             f"requires: {sorted(self.requires)}")
        if stats.H is not None:
            if tuple(stats.H.shape) != (in_features, in_features):
                raise ValueError(f"{where}H has shape {tuple(stats.H.shape)}, expected "
                                 f"({in_features}, {in_features})")
            check_finite(stats.H, "Hessian H", name)
        if stats.act_abs_mean is not None:
            if tuple(stats.act_abs_mean.shape) != (in_features,):
                raise ValueError(f"{where}act_abs_mean has shape {tuple(stats.act_abs_mean.shape)}, "
                                 f"expected ({in_features},)")
            check_finite(stats.act_abs_mean, "act_abs_mean", name)
        if stats.fisher is not None:
            if tuple(stats.fisher.shape) != tuple(W.shape):
                raise ValueError(f"{where}fisher has shape {tuple(stats.fisher.shape)}, expected {tuple(W.shape)}")
            check_finite(stats.fisher, "fisher", name)
        return self.fn(W, spec, stats)


def check_finite(t: torch.Tensor, what: str, name: str | None = None) -> None:
    """Raise ``ValueError`` naming the layer if ``t`` has NaN or Inf entries."""
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        where = f"layer {name}: " if name else ""
        raise ValueError(f"{where}{what} contains {n_nan} NaN and {n_inf} Inf values "
                         f"(of {t.numel()}); cannot quantize")


METHODS: dict[str, Method] = {}

# Modules registering the bundled methods, imported on first registry lookup.
_METHOD_MODULES = ("rtn", "gptq", "awq", "quantease", "quantease_outlier", "nonuniform")


def register(method: Method) -> Method:
    """Add a method to ``METHODS`` (a name may be registered once)."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def _load_bundled() -> None:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def known_methods() -> list[str]:
    _load_bundled()
    return sorted(METHODS)


def get_method(name: str) -> Method:
    """Look up a method by name; unknown names raise ``ValueError`` listing the known ones."""
    _load_bundled()
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(METHODS), n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; known: {', '.join(sorted(METHODS))}") from None


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Layer output error ``||W X - W_hat X||_F^2 = tr(E H E^T)`` with ``E = W - W_hat``, ``H = X X^T``."""
    E = (W - W_hat).double()
    return float(((E @ H.double()) * E).sum())


def weight_from_grid(codes: torch.Tensor, params: GridParams, spec: QuantSpec, **extra: Any) -> QuantizedWeight:
    """Assemble a ``QuantizedWeight`` from codes ``(out, in)`` and the grid parameters that made them."""
    return QuantizedWeight(
        codes=codes.to(torch.uint8), scales=params.scales.contiguous(),
        offsets=None if params.offsets is None else params.offsets.contiguous(),
        table=params.table, group_size=params.group_size, outliers=extra.pop("outliers", None),
        dtype=params.dtype, spec=spec, **extra,
    )
