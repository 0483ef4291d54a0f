"""Scales and the one reference round-to-grid shared by every data type and method.

Representation (INTERFACES.md): ``W[o, i] = table[codes[o, i]] * scales[o, g] + offsets[o, g]`` with
``g = i // group_size``. Groups run along the input dimension; when ``group_size`` does not divide
``in_features`` the last group is partial (``n_groups = ceil(in / group_size)``).

Scale rules (per output row ``o`` and group ``g``, ``w`` = the group's weights):

- symmetric (int, fp, nf): the smallest scale at which nothing clips,
  ``s = max(max(w, 0) / grid_max, min(w, 0) / grid_min)``; for grids symmetric about 0 this is
  ``absmax / grid_max``; for two's-complement ints (``-2**(b-1) .. 2**(b-1)-1``) it lets a group whose
  extreme value is negative use the extra code. Stored as fp16 (rounded here, so the dequantized weights
  are exactly what 16 bits can hold); an all-zero group gets scale 1.
- asymmetric ints (GPTQ ``Quantizer``, ``sym=False``): range ``[min(w, 0), max(w, 0)]``,
  ``s = (xmax - xmin) / (2**b - 1)`` (fp16), integer zero point ``z = round(-xmin / s)`` in ``[0, 2**b-1]``,
  unsigned table ``0 .. 2**b-1`` and ``offset = -z * s``.
- MX (OCP MX v1.0 §6.3): blocks of 32, ``X = 2**(floor(log2(amax)) - emax_elem)`` as an E8M0 exponent
  clamped to [-127, 127]; elements are rounded to the element grid with saturation.

Rounding: ``y = (w - offset) / s`` computed as ``w / s + z``; ``bucketize`` of ``y`` on the midpoints of
the sorted grid (ties go to the lower grid value); the grid index maps to a code through ``grid_codes``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .dtypes import DataType

__all__ = [
    "Rounder", "GridParams", "rounder_for", "compute_grid_params", "round_to_grid", "quantize_rtn",
    "dequantize", "n_groups", "expand_groups", "effective_group_size",
]

E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
FP16_MAX = 65504.0


class Rounder:
    """Nearest-value rounding onto a sorted grid: ``bucketize`` on midpoints.

    Args:
        grid: sorted values, ``(K,)`` shared or ``(rows, K)`` one grid per row.
        codes: code of each grid entry, same shape as ``grid`` (default: the index itself).
    """

    def __init__(self, grid: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        grid = grid.to(torch.float32)
        self.grid = grid
        mid64 = (grid[..., 1:].double() + grid[..., :-1].double()) / 2  # exact
        self.midpoints = mid64.float()  # (..., K-1)
        self._by_dtype = {torch.float32: (grid, self.midpoints), torch.float64: (grid.double(), mid64)}
        self.codes = torch.arange(grid.shape[-1]).expand_as(grid) if codes is None else codes.long()
        # Fast path for evenly spaced shared grids (int, mxint) with a power-of-two step and codes in
        # grid order: the nearest integer to t = y / step with ties down, ceil(t - 1/2), minus g0 / step.
        # Computed in float64, where y / step and t - 1/2 are exact for any float32 y, so it is the same
        # index and tie rule as the bucketize reference.
        self.uniform: tuple[float, float, int] | None = None
        if grid.dim() == 1 and grid.numel() > 1:
            steps = grid[1:] - grid[:-1]
            step = float(steps[0])
            in_order = torch.equal(self.codes, torch.arange(grid.numel()))
            if bool((steps == step).all()) and step > 0 and math.log2(step).is_integer() and in_order:
                self.uniform = (float(grid[0]), step, grid.numel() - 1)
        # Fast path for other shared grids and float32 input: a table over the top 16 bits of the float32
        # bit pattern (sign, exponent, 7 mantissa bits). Each such bucket is a closed interval of floats;
        # where it holds at most one midpoint ``m``, the bucketize index of every ``y`` in it is
        # ``base + (y > m)`` with ``base`` the number of midpoints below the bucket. Built once per grid;
        # grids with two midpoints in one bucket keep the reference.
        self.lut: tuple[torch.Tensor, torch.Tensor] | None = None
        if grid.dim() == 1 and self.uniform is None and grid.numel() > 1:
            self.lut = _bucket_table(self.midpoints)

    def index(self, y: torch.Tensor) -> torch.Tensor:
        """Index of the nearest grid value for each element of ``y`` (long, same shape)."""
        if self.uniform is not None:
            g0, step, last = self.uniform
            t = y.double()
            if step != 1.0:
                t = t / step
            t = (t - 0.5).ceil_()
            if g0 != 0.0:
                t -= g0 / step
            return t.clamp_(0, last).long()
        if self.lut is not None and y.dtype == torch.float32 and not bool(torch.isnan(y).any()):
            base, mid = self.lut
            y = y.contiguous()
            k = (y.view(torch.int32) >> 16).bitwise_and_(0xFFFF).long().view(-1)
            return base.index_select(0, k).add_(y.view(-1) > mid.index_select(0, k)).view(y.shape)
        return self.index_reference(y)

    def values(self, y: torch.Tensor) -> torch.Tensor:
        """The nearest grid values alone, equal to ``self(y)[1]`` (tested), without int64 codes.

        Evenly spaced grids and float32 ``y``: ``t = y / step`` (exact: a power of two), then the nearest
        integer with ties down as ``floor(t) + (t > floor(t) + 1/2)`` (``floor(t) + 1/2`` is exact in
        float32 wherever ``t`` has a fraction), clamped to the grid: the index ``ceil(t - 1/2)`` of
        ``index`` without float64."""
        if self.uniform is not None and y.dtype == torch.float32:
            g0, step, last = self.uniform
            t = y / step if step != 1.0 else y
            f = torch.floor(t)
            n = f + torch.gt(t, f + 0.5)
            lo = g0 / step
            return n.clamp_(lo, lo + last).mul_(step).add_(0.0)
        return self(y)[1]

    def index_reference(self, y: torch.Tensor) -> torch.Tensor:
        """The reference: ``bucketize`` on the midpoints (``searchsorted`` per row for row grids)."""
        midpoints = self._by_dtype[y.dtype][1]
        if midpoints.dim() == 1:
            return torch.bucketize(y, midpoints)
        # per-row grids: y is (rows, cols) or (rows,)
        flat = y.unsqueeze(-1) if y.dim() == 1 else y
        idx = torch.searchsorted(midpoints, flat.contiguous())
        return idx.squeeze(-1) if y.dim() == 1 else idx

    def __call__(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (codes long, unit values in ``y``'s dtype) of the nearest grid points."""
        idx = self.index(y)
        if self.uniform is not None:  # codes are grid indices; values g0 + idx * step are exact
            g0, step, _ = self.uniform
            unit = idx.to(y.dtype)
            if step != 1.0:
                unit = unit * step
            if g0 != 0.0:
                unit = unit + g0
            return idx, unit
        grid = self._by_dtype[y.dtype][0]
        if grid.dim() == 1:
            return self.codes[idx], grid[idx]
        idx2 = idx.unsqueeze(-1) if y.dim() == 1 else idx
        unit, codes = torch.gather(grid, -1, idx2), torch.gather(self.codes, -1, idx2)
        if y.dim() == 1:
            unit, codes = unit.squeeze(-1), codes.squeeze(-1)
        return codes, unit


def _bucket_table(midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(base, midpoint) per top-16-bit float32 bucket for ``Rounder.index`` (see there); None when a
    bucket holds more than one midpoint."""
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    first = ((top + 0) & 0xFFFFFFFF).to(torch.int64)
    last = first | 0xFFFF
    to_f = lambda bits: torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    a, b = to_f(first), to_f(last)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)  # the bucket's floats: [lo, hi] (NaN buckets: NaN)
    mids = midpoints.to(torch.float32)
    base = torch.bucketize(lo, mids)  # midpoints < lo
    inside = torch.bucketize(hi, mids, right=True) - base  # midpoints in [lo, hi]
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    if bool((inside[finite] > 1).any()):
        return None
    mid = torch.full((1 << 16,), math.inf, dtype=torch.float32)
    one = finite & (inside == 1)
    mid[one] = mids[base[one]]
    # the buckets of +-inf: the reference's index of the infinity itself
    inf = ~finite
    base[inf] = torch.bucketize(torch.where(a[inf] > 0, math.inf, -math.inf), mids)
    return base, mid


@lru_cache(maxsize=None)
def _rounder_cached(name: str, symmetric: bool) -> Rounder:
    from .dtypes import get_dtype

    dtype = get_dtype(name)
    if symmetric:
        values, codes = dtype.grid_and_codes
        return Rounder(torch.tensor(values, dtype=torch.float32), torch.tensor(codes))
    return Rounder(dtype.table_tensor(symmetric=False))


def rounder_for(dtype: DataType, symmetric: bool = True) -> Rounder:
    """The shared ``Rounder`` of a data type (asymmetric: the unsigned integer grid)."""
    if not symmetric and not dtype.supports_asymmetric:
        raise ValueError(f"{dtype.name} has no asymmetric form; only int types do")
    return _rounder_cached(dtype.name, symmetric)


# ----- groups ------------------------------------------------------------------------------------
def effective_group_size(dtype: DataType, group_size: int | None, in_features: int) -> int:
    """Columns per scale: the MX block, the spec's group, or ``in_features`` (per output channel)."""
    if dtype.block_size is not None:
        return dtype.block_size
    return in_features if group_size is None else int(group_size)


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups, counting a last partial group."""
    return -(-in_features // group_size)


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """``(out, n_groups)`` -> ``(out, in_features)`` by repeating each group's value."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def _group_apply(W: torch.Tensor, group_size: int, fn) -> torch.Tensor:
    """Apply ``fn((out, k, g)) -> (out, k)`` to full groups and to the last partial one."""
    out, cols = W.shape
    full = cols // group_size
    parts = []
    if full:
        parts.append(fn(W[:, : full * group_size].reshape(out, full, group_size)))
    if cols % group_size:
        parts.append(fn(W[:, full * group_size:].reshape(out, 1, cols % group_size)))
    return torch.cat(parts, dim=1)


def _range(x: torch.Tensor, trim_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over the last dim, ignoring the ``round(g * f / 2)`` most extreme values per side."""
    n = int(round(x.shape[-1] * trim_fraction / 2)) if trim_fraction > 0 else 0
    n = min(n, (x.shape[-1] - 1) // 2)
    if n == 0:
        return x.amin(-1), x.amax(-1)
    lo = torch.topk(x, n + 1, dim=-1, largest=False).values[..., -1]
    hi = torch.topk(x, n + 1, dim=-1, largest=True).values[..., -1]
    return lo, hi


def _to_fp16_scale(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    if scale_dtype == torch.float16:
        s = s.clamp(FP16_TINY, FP16_MAX).to(torch.float16).to(s.dtype)
    return s


# ----- parameters --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridParams:
    """Per-(row, group) scale (and integer zero point) of one weight matrix.

    Attributes:
        scales: ``(out, n_groups)`` float32.
        zero_points: ``(out, n_groups)`` float32 holding integers, asymmetric ints only; else ``None``.
        group_size: columns per group (MX: 32; per channel: in_features).
        dtype, symmetric: the format.
    """

    scales: torch.Tensor
    zero_points: torch.Tensor | None
    group_size: int
    dtype: DataType
    symmetric: bool

    @property
    def offsets(self) -> torch.Tensor | None:
        """``(out, n_groups)`` float32: ``-zero_point * scale`` (asymmetric), else ``None``."""
        return None if self.zero_points is None else -self.zero_points * self.scales

    @property
    def table(self) -> torch.Tensor:
        return self.dtype.table_tensor(self.symmetric)

    @property
    def rounder(self) -> Rounder:
        return rounder_for(self.dtype, self.symmetric)

    def columns(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point for columns ``start:stop``, each ``(out, stop - start)``."""
        g = torch.arange(start, stop) // self.group_size
        zp = None if self.zero_points is None else self.zero_points[:, g]
        return self.scales[:, g], zp


def compute_grid_params(
    W: torch.Tensor,
    dtype: DataType,
    group_size: int | None,
    symmetric: bool = True,
    trim_fraction: float = 0.0,
    scale_dtype: torch.dtype = torch.float16,
    exclude: torch.Tensor | None = None,
) -> GridParams:
    """Scales (and zero points) for every (row, group) of ``W`` by the rules in the module docstring.

    Args:
        W: ``(out, cols)`` float32, or float64 (then scales/zero points are float64 holding the same
            values) (cols may be a slice of a layer, e.g. one GPTQ group).
        group_size: columns per group; ``None`` = one group over all columns. Ignored for MX (32).
        trim_fraction: exclude ``round(g * f / 2)`` extreme values on each side from the range
            (QuantEase-outlier: the grid is fitted to the non-outlier weights).
        scale_dtype: ``torch.float16`` (stored format) or ``torch.float32`` (to reproduce references).
        exclude: optional ``(out, cols)`` bool mask of weights left out of the range (kept elsewhere,
            e.g. as full-precision outliers); they count as 0, which every range contains.
    Returns:
        ``GridParams`` with ``scales`` ``(out, ceil(cols / group))``.
    """
    W = W if W.dtype == torch.float64 else W.to(torch.float32)
    if exclude is not None:
        W = W.masked_fill(exclude, 0.0)
    cols = W.shape[1]
    g = effective_group_size(dtype, group_size, cols)
    lo = _group_apply(W, g, lambda x: _range(x, trim_fraction)[0])  # (out, n_groups)
    hi = _group_apply(W, g, lambda x: _range(x, trim_fraction)[1])
    if dtype.scale_format == "e8m0":
        amax = torch.maximum(lo.abs(), hi.abs())
        _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)  ->  floor(log2 amax) = e - 1
        exp = torch.where(amax > 0, e - 1 - dtype.emax_elem, torch.full_like(e, E8M0_MIN_EXP))
        exp = exp.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
        return GridParams(torch.exp2(exp.to(W.dtype)), None, g, dtype, True)
    zero = torch.zeros_like(lo)
    xmin, xmax = torch.minimum(lo, zero), torch.maximum(hi, zero)
    if symmetric:
        s = torch.maximum(xmax / dtype.grid_max, xmin / dtype.grid_min)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return GridParams(_to_fp16_scale(s, scale_dtype), None, g, dtype, True)
    maxq = 2**dtype.bits - 1
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    s = _to_fp16_scale((xmax - xmin) / maxq, scale_dtype)
    zp = torch.round(-xmin / s).clamp(0, maxq)
    return GridParams(s, zp, g, dtype, False)


def round_to_grid(
    x: torch.Tensor, rounder: Rounder, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``x`` to the nearest point of ``grid * scale + offset`` (``offset = -zero_point * scale``).

    Args:
        x: ``(rows, cols)`` or ``(rows,)``; ``scale`` / ``zero_point`` broadcast against it.
        rounder: the grid (shared, or one per row for codebooks).
    Returns:
        (codes long, dequantized values float32 computed as ``table[code] * scale + offset``).
    """
    y = x / scale
    if zero_point is not None:
        y = y + zero_point
    codes, unit = rounder(y)
    values = unit * scale
    if zero_point is not None:
        values = values + (-zero_point * scale)
    return codes, values


def quantize_rtn(
    W: torch.Tensor,
    dtype: DataType,
    group_size: int | None,
    symmetric: bool = True,
    trim_fraction: float = 0.0,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, GridParams]:
    """Round-to-nearest of a whole matrix.

    Returns:
        codes ``(out, in)`` long and the ``GridParams`` (scales/offsets ``(out, n_groups)``, table).
    """
    params = compute_grid_params(W, dtype, group_size, symmetric, trim_fraction, scale_dtype)
    s, zp = params.columns(0, W.shape[1])
    codes, _ = round_to_grid(W if W.dtype == torch.float64 else W.to(torch.float32), params.rounder, s, zp)
    return codes, params


def dequantize(
    codes: torch.Tensor,
    table: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``W[o, i] = table[codes[o, i]] * scales[o, i // g] + offsets[o, i // g]`` -> ``(out, in)`` float32."""
    codes = codes.long()
    in_features = codes.shape[1]
    if table.dim() == 1:
        unit = table[codes]
    else:
        unit = torch.gather(table, 1, codes)
    W = unit * expand_groups(scales, group_size, in_features)
    if offsets is not None:
        W = W + expand_groups(offsets, group_size, in_features)
    return W
