"""``QuantSpec``: a quantization recipe as a frozen value with a canonical string form.

Grammar (fields separated by ``:``, in this order)::

    <method>:<dtype>[:g<group_size>][:asym][:<option>...]

    rtn:int4            gptq:int4:g128          gptq:int3:g128:asym:act
    rtn:mxfp4           quantease:int3:g128     quantease-outlier:int3:g128:o0.02

- no ``g`` token = one scale per output channel (row); MX types have a fixed block of 32 and take no
  ``g`` token.
- ``asym`` (integer types only): min-max range with an integer zero point per group.
- options are the method's own (``get_method(m).options``), written in the method's declared order;
  flags are bare names (``act``), valued options are name + value (``o0.01``, ``it20``).

Only the canonical form parses (defaults omitted, fixed order), so ``str(QuantSpec.parse(s)) == s`` for
every accepted string and ``QuantSpec.parse(str(spec)) == spec`` for every valid spec. A
non-canonical string is refused with the canonical spelling in the message.

Bits per weight (``QuantSpec.bits_per_weight``), with ``b`` = code bits, ``n`` = in_features,
``G = ceil(n / g)`` groups per row (a last partial group is allowed and counted):

- codes: ``b``
- scales: ``16 * G / n`` (fp16 per row or group); MX: ``8 * ceil(n / 32) / n`` (E8M0 per block)
- asymmetric ints: ``+ b * G / n`` (a ``b``-bit integer zero point per group)
- nonuniform: ``+ 16 * 2**b / n`` (a per-row fp16 codebook of ``2**b`` entries)
- quantease-outlier: ``+ 48 * f`` for an outlier fraction ``f`` (per outlier an fp16 value and a 32-bit
  flat index)
- awq: the per-input-channel scale is not counted (in deployment it folds into the previous op, as in the
  AWQ paper; it is ``16 / out_features`` bits per weight if stored).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["QuantSpec", "Option"]


# The largest group size a spec may name: wider than any layer's input (a group at least as wide as the
# row is one group per row), small enough that every size computed from it stays an exact machine integer.
MAX_GROUP_SIZE = 1 << 20


@dataclass(frozen=True)
class Option:
    """A method option: a flag (``kind=bool``) or a valued option (``int``/``float``)."""

    name: str
    kind: type
    default: Any
    help: str
    max_value: float | None = None  # valued options must lie in (0, max_value]

    def token(self, value: Any) -> str:
        if self.kind is bool:
            return self.name
        if self.kind is float:
            return f"{self.name}{float(value)!r}"
        return f"{self.name}{int(value)}"

    def usage(self) -> str:
        what = "" if self.kind is bool else f"<{self.kind.__name__}>"
        dflt = "" if self.kind is bool else f", default {self.default}"
        return f"{self.name}{what} ({self.help}{dflt})"


def _methods():
    from .base import get_method, known_methods

    return get_method, known_methods


def _option_list(method) -> str:
    return ", ".join(o.usage() for o in method.options) or "none"


@dataclass(frozen=True)
class QuantSpec:
    """A quantization recipe: method, data type, group, symmetry and method options.

    Args:
        method: registered method name (``quantizers.METHODS``).
        dtype: registered data type name (``quantizers.DTYPES``).
        group_size: input columns per scale; ``None`` = per output channel (and for MX, whose block is 32).
        symmetric: ``False`` only for integer types (``asym``).
        options: mapping or tuple of (name, value); stored as a tuple in the method's declared order
            with defaults dropped.
    """

    method: str
    dtype: str
    group_size: int | None = None
    symmetric: bool = True
    options: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        from .dtypes import get_dtype

        get_method, _ = _methods()
        method = get_method(self.method)
        dt = get_dtype(self.dtype)
        if dt.family not in method.dtype_families:
            ok = ", ".join(sorted(method.dtype_families))
            raise ValueError(f"method {method.name} does not support {dt.family} type {dt.name}; "
                             f"supported families: {ok}")
        gs = self.group_size
        if gs is not None:
            if isinstance(gs, bool) or not isinstance(gs, int) or gs < 1:
                raise ValueError(f"group_size must be a positive int or None (per channel), got {gs!r}")
            if gs > MAX_GROUP_SIZE:
                raise ValueError(f"group size {gs} is beyond any layer width (at most {MAX_GROUP_SIZE}); drop "
                                 f"':g{gs}' for one group per output channel")
            if dt.block_size is not None:
                raise ValueError(f"{dt.name} is an MX type with a fixed block of {dt.block_size}; "
                                 f"drop ':g{gs}' (MX blocks are not configurable)")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if not self.symmetric:
            if not dt.supports_asymmetric:
                raise ValueError(f"'asym' applies only to integer types (int2, int3, int4, int8), not {dt.name}")
            if not method.supports_asymmetric:
                raise ValueError(f"method {method.name} does not take 'asym'")
        object.__setattr__(self, "options", self._normalize_options(method, self.options))
        if method.validate is not None:
            method.validate(self, dt)

    @staticmethod
    def _normalize_options(method, options) -> tuple[tuple[str, Any], ...]:
        given = dict(options.items() if isinstance(options, Mapping) else options)
        by_name = {o.name: o for o in method.options}
        unknown = [k for k in given if k not in by_name]
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} for method {method.name}; "
                             f"valid options: {_option_list(method)}")
        out = []
        for opt in method.options:
            if opt.name not in given:
                continue
            value = given[opt.name]
            try:
                value = _coerce(opt, value)
            except (TypeError, ValueError):
                raise ValueError(f"option {opt.name} of {method.name} takes {opt.kind.__name__}, "
                                 f"got {value!r}") from None
            if opt.kind is not bool and not (0 < value <= (opt.max_value or math.inf)):
                limit = "" if opt.max_value is None else f" and <= {opt.max_value}"
                raise ValueError(f"option {opt.name} of {method.name} must be > 0{limit}, got {value!r}")
            if value != opt.default:
                out.append((opt.name, value))
        return tuple(out)

    # ----- accessors -------------------------------------------------------------------------------
    def option(self, name: str) -> Any:
        """Value of a method option (its default when not set)."""
        get_method, _ = _methods()
        method = get_method(self.method)
        for opt in method.options:
            if opt.name == name:
                return dict(self.options).get(name, opt.default)
        raise ValueError(f"method {self.method} has no option {name!r}; valid options: {_option_list(method)}")

    def with_options(self, **options: Any) -> "QuantSpec":
        merged = dict(self.options)
        merged.update(options)
        return QuantSpec(self.method, self.dtype, self.group_size, self.symmetric, merged)

    # ----- string form -----------------------------------------------------------------------------
    def __str__(self) -> str:
        get_method, _ = _methods()
        method = get_method(self.method)
        parts = [self.method, self.dtype]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if not self.symmetric:
            parts.append("asym")
        by_name = {o.name: o for o in method.options}
        parts += [by_name[k].token(v) for k, v in self.options]
        return ":".join(parts)

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Parse the canonical string form (see module docstring).

        Raises:
            ValueError: naming the valid methods, dtypes or options, or giving the canonical spelling.
        """
        from .dtypes import DTYPES

        get_method, known_methods = _methods()
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"empty spec; expected '<method>:<dtype>[:g<N>][:asym][:options]', "
                             f"e.g. 'gptq:int4:g128'; methods: {', '.join(known_methods())}")
        parts = text.split(":")
        if len(parts) < 2:
            raise ValueError(f"spec {text!r} needs at least '<method>:<dtype>'; e.g. 'rtn:int4'; "
                             f"methods: {', '.join(known_methods())}; dtypes: {', '.join(sorted(DTYPES))}")
        method = get_method(parts[0])
        group_size: int | None = None
        symmetric = True
        options: dict[str, Any] = {}
        for tok in parts[2:]:
            if tok.startswith("g") and tok[1:].isdigit():
                if group_size is not None:
                    raise ValueError(f"spec {text!r}: group size given twice")
                digits = tok[1:].lstrip("0") or "0"
                if len(digits) > len(str(MAX_GROUP_SIZE)) or int(digits) > MAX_GROUP_SIZE:  # before int() of it all
                    shown = tok if len(tok) <= 24 else f"{tok[:21]}..."
                    raise ValueError(f"spec {text[:60]!r}: group size {shown[1:]} is beyond any layer width (at most "
                                     f"{MAX_GROUP_SIZE}); drop ':{shown}' for one group per output channel")
                group_size = int(tok[1:])
                if str(group_size) != tok[1:]:
                    raise ValueError(f"spec {text!r}: write the group as 'g{group_size}'")
                continue
            if tok == "asym":
                symmetric = False
                continue
            if tok == "sym":
                raise ValueError(f"spec {text!r}: symmetric is the default; omit 'sym'")
            opt, value = _parse_option(method, tok, text)
            if opt.name in options:
                raise ValueError(f"spec {text!r}: option {opt.name!r} given twice")
            options[opt.name] = value
        spec = cls(method.name, parts[1], group_size, symmetric, options)
        canonical = str(spec)
        if canonical != text:
            raise ValueError(f"spec {text!r} is not in canonical form; write it as {canonical!r} "
                             f"(order method:dtype:g<N>:asym:options; defaults omitted)")
        return spec

    # ----- size -----------------------------------------------------------------------------------
    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Exact storage bits per weight including scales, zero points, codebooks and outliers.

        Args:
            in_features: layer input width. Needed for per-channel specs and for ``nonuniform``; with
                ``None`` a grouped spec assumes the group divides the width.
        Raises:
            ValueError: per-channel or codebook overhead requested without ``in_features``.
        """
        from .dtypes import get_dtype

        get_method, _ = _methods()
        dt = get_dtype(self.dtype)
        method = get_method(self.method)
        if in_features is not None and (isinstance(in_features, bool) or int(in_features) < 1):
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dt.block_size is not None:
            g = dt.block_size
        elif self.group_size is not None:
            g = self.group_size
        elif in_features is not None:
            g = int(in_features)
        else:
            raise ValueError(f"{self}: a per-channel scale costs 16 / in_features bits per weight; "
                             f"pass in_features")
        groups_per_weight = (math.ceil(in_features / g) / in_features) if in_features else 1.0 / g
        scale_bits = 8 if dt.scale_format == "e8m0" else 16
        bits = dt.bits + scale_bits * groups_per_weight
        if not self.symmetric:
            bits += dt.bits * groups_per_weight
        if method.extra_bits is not None:
            bits += method.extra_bits(self, in_features)
        return float(bits)


def _coerce(opt: Option, value: Any) -> Any:
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if isinstance(value, bool):
        raise TypeError
    if opt.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError
    return value


def _parse_option(method, tok: str, text: str) -> tuple[Option, Any]:
    for opt in method.options:
        if opt.kind is bool and tok == opt.name:
            return opt, True
    matches = sorted((o for o in method.options if o.kind is not bool and tok.startswith(o.name)),
                     key=lambda o: -len(o.name))
    for opt in matches:
        raw = tok[len(opt.name):]
        try:
            value = opt.kind(raw)
        except ValueError:
            continue
        return opt, value
    names = [o.name for o in method.options]
    close = difflib.get_close_matches(tok, names, n=2)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"spec {text!r}: unknown token {tok!r}{hint}; after '<method>:<dtype>' come "
                     f"'g<N>' (group size), 'asym', and options of {method.name}: {_option_list(method)}")
