"""Data type registry: value tables against ml_dtypes / QLoRA / OCP MX, and lookup errors."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import advisor.quantizers as q
from advisor.quantizers.dtypes import MX_BLOCK

ML_DTYPES = {
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, 8),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, 8),
    "fp6_e3m2": (ml_dtypes.float6_e3m2fn, 6),
    "fp6_e2m3": (ml_dtypes.float6_e2m3fn, 6),
    "fp4_e2m1": (ml_dtypes.float4_e2m1fn, 4),
}

# QLoRA (bitsandbytes functional.py) NF4 code values
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


@pytest.mark.parametrize("name", sorted(q.DTYPES))
def test_table_shape_and_grid(name):
    dt = q.get_dtype(name)
    assert dt.name == name and dt.description and dt.family in {"int", "fp", "nf", "mx"}
    assert len(dt.table) == 2**dt.bits
    grid, codes = dt.grid_and_codes
    assert list(grid) == sorted(set(float(v) + 0.0 for v in dt.table))
    assert all(dt.table[c] == v for c, v in zip(codes, grid))
    assert dt.grid_min < 0 < dt.grid_max and 0.0 in grid


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_fp_tables_match_ml_dtypes_bit_patterns(name):
    ml_type, bits = ML_DTYPES[name]
    values = np.arange(2**bits, dtype=np.uint8).view(ml_type).astype(np.float64)
    table = np.array(q.get_dtype(name).table)
    finite = np.isfinite(values)
    np.testing.assert_array_equal(table[finite], values[finite])  # code == real bit pattern
    # NaN/Inf patterns are excluded from the grid and never produced
    grid = np.array(q.get_dtype(name).grid)
    expect = np.unique(values[finite] + 0.0)
    np.testing.assert_array_equal(grid, expect)
    assert grid.max() == float(ml_dtypes.finfo(ml_type).max)


def test_fp6_e3m2_follows_fp6_llm_convention():
    dt = q.get_dtype("fp6_e3m2")
    pos = [v for v in dt.grid if v > 0]
    assert max(pos) == 28.0 and min(pos) == 0.0625  # bias 3, no Inf/NaN, subnormals
    assert 0.25 in pos and len(dt.grid) == 63
    assert q.get_dtype("fp6_e2m3").grid_max == 7.5 and q.get_dtype("fp4_e2m1").grid_max == 6.0
    assert q.get_dtype("fp8_e4m3").grid_max == 448.0 and q.get_dtype("fp8_e5m2").grid_max == 57344.0


def test_nf4_matches_qlora_and_nf3_is_analogous():
    np.testing.assert_allclose(q.get_dtype("nf4").grid, QLORA_NF4, atol=1e-6)
    nf3 = q.get_dtype("nf3").grid
    assert len(nf3) == 8 and nf3[0] == -1.0 and nf3[-1] == 1.0 and nf3[3] == 0.0
    assert sum(v > 0 for v in nf3) == 4 and sum(v < 0 for v in nf3) == 3


def test_int_tables_are_twos_complement_offset_binary():
    dt = q.get_dtype("int3")
    assert dt.table == tuple(float(v) for v in range(-4, 4))
    assert dt.unsigned_table == tuple(float(v) for v in range(8))
    with pytest.raises(ValueError, match="only int"):
        q.get_dtype("nf4").unsigned_table


@pytest.mark.parametrize("name,element,emax", [
    ("mxfp8_e4m3", "fp8_e4m3", 8), ("mxfp6_e3m2", "fp6_e3m2", 4), ("mxfp6_e2m3", "fp6_e2m3", 2),
    ("mxfp4", "fp4_e2m1", 2), ("mxint8", "mxint8", 0), ("mxint4", "mxint4", 0),
])
def test_mx_types_follow_ocp(name, element, emax):
    dt = q.get_dtype(name)
    assert dt.family == "mx" and dt.block_size == MX_BLOCK == 32 and dt.scale_format == "e8m0"
    assert dt.emax_elem == emax and dt.element == element
    if element in q.DTYPES:
        assert dt.table == q.get_dtype(element).table
    else:  # MXINT: fixed point with 2**-(bits-2) implicit scale
        step = 2.0 ** -(dt.bits - 2)
        assert dt.grid[1] - dt.grid[0] == step and dt.grid_max == 2 - step


def test_unknown_dtype_names_close_matches_and_all_known():
    with pytest.raises(ValueError) as e:
        q.get_dtype("fp6_e3m3")
    msg = str(e.value)
    assert "fp6_e3m2" in msg and "known:" in msg
    for name in q.DTYPES:
        assert name in msg


def test_table_tensor_dtype():
    t = q.get_dtype("int4").table_tensor()
    assert t.dtype == torch.float32 and t.shape == (16,)
