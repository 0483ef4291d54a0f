"""Weight data types: a registry of value tables at unit scale.

Every format here is "code -> value table -> times a scale (+ offset)", with at most 8 bits per code,
so a single round-to-grid (``quantizers.grid``) serves all of them. A ``DataType`` records:

- ``table``: float64 tuple of length ``2**bits`` in *code order* (the value of each code at unit scale).
  Integer codes are offset binary (value = code - 2**(bits-1)); floating-point codes are the real bit
  patterns (sign | exponent | mantissa), so a kernel may decode them with bit tricks (FP6-LLM) or a lookup;
  NaN/Inf bit patterns (only in fp8) are given the largest finite value of the same sign and are never
  produced by rounding. Normal-float codes index the sorted codebook.
- ``grid`` / ``grid_codes``: the sorted distinct finite values and, for each, the code that produces it
  (``-0.0`` is never produced).
- scaling rule: ``scale_format`` ``"fp16"`` (one fp16 scale per output row or per group) or ``"e8m0"``
  (OCP MX: one 8-bit power-of-two scale per block of 32 along the input dimension).

Asymmetric integers use the unsigned table ``0 .. 2**bits - 1`` with an integer zero point per group
(see ``DataType.unsigned_table`` and ``quantizers.grid``).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from functools import cached_property

import torch

__all__ = ["DataType", "DTYPES", "get_dtype", "fp_table", "normal_float_table"]

MX_BLOCK = 32  # OCP MX v1.0: k = 32 elements share one E8M0 scale


@dataclass(frozen=True)
class DataType:
    """A weight element format with its unit-scale value table.

    Attributes:
        name: registry key, e.g. ``"int4"``, ``"fp6_e3m2"``, ``"mxfp4"``.
        family: ``"int"``, ``"fp"``, ``"nf"`` or ``"mx"``.
        bits: bits per stored code (element bits; scales are extra, see ``QuantSpec.bits_per_weight``).
        description: one line for ``advisor ls``.
        table: value of each code at unit scale, length ``2**bits``, code order.
        scale_format: ``"fp16"`` or ``"e8m0"``.
        block_size: fixed block for MX (32), ``None`` for formats whose group comes from the spec.
        element: for MX, the element format name (``"int4"``-like ``"mxint4_elem"`` or ``"fp4_e2m1"``).
        emax_elem: for MX, exponent of the largest power of two <= the element format's max magnitude.
    """

    name: str
    family: str
    bits: int
    description: str
    table: tuple[float, ...] = field(repr=False)
    scale_format: str = "fp16"
    block_size: int | None = None
    element: str | None = None
    emax_elem: int | None = None

    def __post_init__(self) -> None:
        if len(self.table) != 2**self.bits:
            raise ValueError(f"{self.name}: table has {len(self.table)} entries, expected {2**self.bits}")
        if not all(math.isfinite(v) for v in self.table):
            raise ValueError(f"{self.name}: table must be finite")

    # ----- derived views -------------------------------------------------------------------------
    @cached_property
    def grid_and_codes(self) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """Sorted distinct values and, for each, the smallest code producing it (so +0 not -0)."""
        first_code: dict[float, int] = {}
        for code, value in enumerate(self.table):
            key = float(value) + 0.0  # -0.0 -> 0.0
            if key not in first_code or self._prefer(code, first_code[key]):
                first_code[key] = code
        values = tuple(sorted(first_code))
        return values, tuple(first_code[v] for v in values)

    def _prefer(self, code: int, current: int) -> bool:
        # Prefer non-special codes: for fp8 the NaN/Inf patterns duplicate the max finite value.
        special = self._special_codes()
        if current in special and code not in special:
            return True
        if code in special:
            return False
        return code < current

    def _special_codes(self) -> frozenset[int]:
        return _SPECIAL_CODES.get(self.element or self.name, frozenset())

    @property
    def grid(self) -> tuple[float, ...]:
        """Sorted distinct representable values at unit scale."""
        return self.grid_and_codes[0]

    @property
    def grid_min(self) -> float:
        return self.grid[0]

    @property
    def grid_max(self) -> float:
        return self.grid[-1]

    @property
    def max_abs(self) -> float:
        """Largest magnitude on the grid (``scale = absmax / max_abs`` for symmetric grids)."""
        return max(abs(self.grid[0]), abs(self.grid[-1]))

    @property
    def supports_asymmetric(self) -> bool:
        return self.family == "int"

    @property
    def unsigned_table(self) -> tuple[float, ...]:
        """Unit table for asymmetric integers: code k -> k (used with an integer zero point)."""
        if not self.supports_asymmetric:
            raise ValueError(f"{self.name} has no asymmetric form; only int types do")
        return tuple(float(k) for k in range(2**self.bits))

    def table_tensor(self, symmetric: bool = True) -> torch.Tensor:
        """The code-order table as float32 ``(2**bits,)``."""
        values = self.table if symmetric else self.unsigned_table
        return torch.tensor(values, dtype=torch.float32)


# ----- table builders ----------------------------------------------------------------------------
def fp_table(exp_bits: int, man_bits: int, bias: int, special: str) -> tuple[list[float], set[int]]:
    """Values of every bit pattern of a small float (sign | exponent | mantissa), with subnormals.

    Args:
        special: ``"none"`` (no Inf/NaN: the top exponent is ordinary, FP6/FP4 convention),
            ``"fn"`` (only all-ones exponent+mantissa is NaN: OCP E4M3) or ``"ieee"`` (top exponent is
            Inf/NaN: E5M2).
    Returns:
        (values in code order with NaN/Inf replaced by the signed max finite value, set of special codes)
    """
    n = 1 + exp_bits + man_bits
    values: list[float] = []
    specials: set[int] = set()
    top = 2**exp_bits - 1
    for code in range(2**n):
        sign = -1.0 if code >> (exp_bits + man_bits) else 1.0
        e = (code >> man_bits) & top
        m = code & (2**man_bits - 1)
        is_special = (special == "ieee" and e == top) or (special == "fn" and e == top and m == 2**man_bits - 1)
        if is_special:
            specials.add(code)
            values.append(float("nan"))
            continue
        if e == 0:
            mag = (m / 2**man_bits) * 2.0 ** (1 - bias)
        else:
            mag = (1 + m / 2**man_bits) * 2.0 ** (e - bias)
        values.append(sign * mag)
    finite_max = max(abs(v) for v in values if not math.isnan(v))
    for code in specials:
        sign = -1.0 if code >> (exp_bits + man_bits) else 1.0
        values[code] = sign * finite_max
    return values, specials


def normal_float_table(bits: int) -> list[float]:
    """QLoRA normal-float codebook with ``2**bits`` values, sorted, including an exact zero.

    As in QLoRA ``create_normal_map(offset, use_extra_value=True)``: ``2**(bits-1)`` positive and
    ``2**(bits-1) - 1`` negative quantiles of N(0, 1), normalized to [-1, 1], plus 0. The tail offset
    generalizes QLoRA's 0.9677 = 1 - (1/(2*16) + 1/(2*15)) / 2 to ``n = 2**bits`` codes.
    """
    n = 2**bits
    offset = 1.0 - 0.5 * (1.0 / (2 * n) + 1.0 / (2 * (n - 1)))
    half = n // 2
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    values = values / values.abs().max()
    return sorted(values.tolist())


def _int_table(bits: int, step: float = 1.0) -> list[float]:
    # offset binary: code k -> (k - 2**(bits-1)) * step; two's-complement range
    return [(k - 2 ** (bits - 1)) * step for k in range(2**bits)]


_SPECIAL_CODES: dict[str, frozenset[int]] = {}


def _fp(name: str, e: int, m: int, bias: int, special: str) -> tuple[float, ...]:
    values, specials = fp_table(e, m, bias, special)
    _SPECIAL_CODES[name] = frozenset(specials)
    return tuple(values)


def _emax(max_abs: float) -> int:
    return math.floor(math.log2(max_abs))


def _build() -> dict[str, DataType]:
    d: dict[str, DataType] = {}

    def add(dt: DataType) -> None:
        d[dt.name] = dt

    for b in (2, 3, 4, 8):
        add(DataType(f"int{b}", "int", b,
                     f"{b}-bit integer, two's-complement grid (symmetric: fp16 scale; asym: + {b}-bit zero point)",
                     tuple(_int_table(b))))
    fp_defs = {
        "fp8_e4m3": (4, 3, 7, "fn", "FP8 E4M3 (OCP/e4m3fn: bias 7, max 448, NaN excluded) with fp16 scale"),
        "fp8_e5m2": (5, 2, 15, "ieee", "FP8 E5M2 (bias 15, max 57344, Inf/NaN excluded) with fp16 scale"),
        "fp6_e3m2": (3, 2, 3, "none", "FP6 E3M2 (bias 3, max 28, subnormals, no Inf/NaN; FP6-LLM) with fp16 scale"),
        "fp6_e2m3": (2, 3, 1, "none", "FP6 E2M3 (bias 1, max 7.5, subnormals, no Inf/NaN) with fp16 scale"),
        "fp4_e2m1": (2, 1, 1, "none", "FP4 E2M1 (bias 1, max 6: 0, .5, 1, 1.5, 2, 3, 4, 6) with fp16 scale"),
    }
    for name, (e, m, bias, special, desc) in fp_defs.items():
        add(DataType(name, "fp", 1 + e + m, desc, _fp(name, e, m, bias, special)))
    add(DataType("nf4", "nf", 4, "4-bit NormalFloat codebook (QLoRA) with fp16 absmax scale",
                 tuple(normal_float_table(4))))
    add(DataType("nf3", "nf", 3, "3-bit NormalFloat codebook (QLoRA construction, 8 values) with fp16 absmax scale",
                 tuple(normal_float_table(3))))

    # OCP MX: element value table at unit scale, shared X = 2**(floor(log2 amax) - emax_elem) per 32.
    for b in (8, 4):
        table = tuple(_int_table(b, step=2.0 ** -(b - 2)))  # fixed point 1.(b-2): k / 2**(b-2), |k| <= 2**(b-1)
        add(DataType(f"mxint{b}", "mx", b,
                     f"OCP MX INT{b}: {b}-bit fixed-point elements (k/{2 ** (b - 2)}), E8M0 scale per 32",
                     table, "e8m0", MX_BLOCK, f"mxint{b}", _emax(max(abs(v) for v in table if v > 0))))
    for name, elem in (("mxfp8_e4m3", "fp8_e4m3"), ("mxfp6_e3m2", "fp6_e3m2"),
                       ("mxfp6_e2m3", "fp6_e2m3"), ("mxfp4", "fp4_e2m1")):
        base = d[elem]
        add(DataType(name, "mx", base.bits, f"OCP MX {elem.upper()} elements, E8M0 power-of-two scale per 32",
                     base.table, "e8m0", MX_BLOCK, elem, _emax(base.max_abs)))
    return d


DTYPES: dict[str, DataType] = _build()


def get_dtype(name: str) -> DataType:
    """Look up a data type by name.

    Raises:
        ValueError: unknown name; the message suggests close matches and lists all known types.
    """
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(DTYPES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown dtype {name!r}{hint}; known: {', '.join(sorted(DTYPES))}") from None
