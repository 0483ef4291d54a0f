"""Packing round trips, layouts against the per-element reference, byte counts (no numba)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advisor import kernels
from advisor.kernels.codebook import classify_table, exmy_grid
from advisor.kernels.int_pack import pack_codes, unpack_codes
from advisor.kernels.reference import pack_reference, unpack_reference

BITS = [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_reference_layout(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (5, 24), generator=g)
    fast = pack_codes(codes, bits)
    ref = pack_reference(codes.numpy(), bits)
    assert fast.keys() == ref.keys()
    for k in fast:
        np.testing.assert_array_equal(fast[k].numpy(), ref[k])
    np.testing.assert_array_equal(unpack_reference(fast, bits, 24), codes.numpy())


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), rows=st.integers(1, 9), cols=st.integers(1, 70),
       seed=st.integers(0, 2 ** 16))
def test_unpack_pack_roundtrip_odd_shapes(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=g)
    table = torch.arange(2 ** bits, dtype=torch.float32)
    mod = kernels.pack_linear(codes, torch.ones(rows, 1), None, bits=bits, table=table,
                              group_size=cols)
    assert mod.in_features == cols and mod.out_features == rows
    assert torch.equal(mod.codes().long(), codes)
    padded = torch.zeros(rows, 8 * math.ceil(cols / 8), dtype=torch.long)
    padded[:, :cols] = codes
    assert torch.equal(unpack_codes(pack_codes(padded, bits), bits).long(), padded)


def test_fp6_split_layout_is_4_plus_2():
    codes = torch.tensor([[0b110101, 0b001010, 0b111111, 0b000001, 0, 0, 0, 0]])
    p = pack_codes(codes, 6)
    assert set(p) == {"q4", "q2"}
    assert p["q4"].tolist() == [[0b0101 | (0b1010 << 4), 0b1111 | (0b0001 << 4), 0, 0]]
    assert p["q2"].tolist() == [[0b11 | (0b00 << 2) | (0b11 << 4) | (0b00 << 6), 0]]


@pytest.mark.parametrize("bits,group,offsets,pow2", [
    (4, 128, True, False), (3, 128, True, False), (2, 64, True, False), (8, 128, False, False),
    (6, 512, False, False), (4, 32, False, True), (8, 32, False, True)])
def test_packed_bytes_match_bits_per_weight_formula(bits, group, offsets, pow2):
    out, inn, nnz = 16, 512, 7
    codes = torch.randint(0, 2 ** bits, (out, inn))
    ng = inn // group
    scales = torch.exp2(torch.randint(-8, 2, (out, ng)).float()) if pow2 else torch.rand(out, ng)
    idx = torch.stack([torch.arange(nnz), torch.arange(nnz) * 3], 1)
    mod = kernels.pack_linear(codes, scales, torch.rand(out, ng) if offsets else None, bits=bits,
                              table=torch.arange(2.0 ** bits), group_size=group,
                              outliers=(idx, torch.randn(nnz)), meta={"scale_pow2": pow2})
    scale_bits = 8 if pow2 else 16
    bits_per_weight = bits + (scale_bits + (16 if offsets else 0)) / group
    expected = out * inn * bits_per_weight / 8 + nnz * (4 + 2) + 2 * 2 ** bits  # fp16 table
    assert mod.packed_bytes() == expected


def test_integer_zero_points_stored_as_uint8_and_exact():
    g = torch.Generator().manual_seed(0)
    out, inn, group = 8, 256, 128
    scales = torch.rand(out, 2, generator=g) * 0.01  # not fp16-exact: stored fp32 on request
    zero = torch.randint(0, 16, (out, 2), generator=g).float()
    mod = kernels.pack_linear(torch.randint(0, 16, (out, inn), generator=g), scales,
                              -zero * scales, bits=4, table=torch.arange(16.0),
                              group_size=group, meta={"scale_dtype": "float32"})
    assert mod.zeros.dtype == torch.uint8 and torch.equal(mod.zeros.float(), zero)
    assert mod.scales.dtype == torch.float32
    assert torch.equal(mod.group_offsets(), -zero * scales)
    fp16 = kernels.pack_linear(torch.zeros(out, inn), scales.half().float(),
                               -zero * scales.half().float(), bits=4, table=torch.arange(16.0),
                               group_size=group, meta={"scale_dtype": "float32"})
    assert fp16.scales.dtype == torch.float16  # lossless, so the smaller storage
    assert fp16.packed_bytes() == out * inn // 2 + out * 2 * (2 + 1) + 2 * 16


def test_classify_tables():
    assert classify_table(np.arange(16.0) - 8, 4).kind == "affine"
    r = classify_table(exmy_grid(3, 2) * 0.5, 6)
    assert r.kind == "exmy" and r.exmy[:2] == (3, 2) and r.mult == 0.5
    assert classify_table(exmy_grid(2, 1), 4).kind == "exmy"
    e4m3 = exmy_grid(4, 3)
    e4m3[127] = e4m3[255] = np.nan  # OCP E4M3FN NaN codes are ignored
    assert classify_table(e4m3, 8).kind == "exmy"
    assert classify_table(np.sort(np.random.default_rng(0).normal(size=16)), 4).kind == "lut16"
    assert classify_table(np.random.default_rng(0).normal(size=(3, 64)), 6).kind == "gather"


def test_exmy_grid_fp6_e3m2_facts():
    g = exmy_grid(3, 2)
    assert g.max() == 28 and g[1] == 0.0625 and g[4] == 0.25  # papers.md section 4


def test_pack_linear_validates():
    with pytest.raises(ValueError):
        kernels.pack_linear(torch.full((2, 8), 16), torch.ones(2, 1), None, bits=4,
                            table=torch.arange(16.0), group_size=8)
    with pytest.raises(ValueError):
        kernels.pack_linear(torch.zeros(2, 8), torch.full((2, 1), 3.0), None, bits=4,
                            table=torch.arange(16.0), group_size=8, meta={"scale_pow2": True})


def test_smollm2_135m_int4_g128_within_3_percent_of_theory():
    # SmolLM2-135M linear shapes (hidden 576, 3 KV heads of 64, MLP 1536, 30 blocks), int4 g128
    # asymmetric, as quantizers/spec.py counts it: 4 bits per weight + an fp16 scale and a 4-bit
    # integer zero point per group of 128 (576 = 4.5 groups: the partial last group is not padded)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
              (576, 1536)]
    packed = theory = 0
    for out, inn in shapes:
        ng = math.ceil(inn / 128)
        mod = kernels.pack_linear(torch.zeros(out, inn, dtype=torch.long), torch.ones(out, ng),
                                  torch.zeros(out, ng), bits=4, table=torch.arange(16.0),
                                  group_size=128)
        assert mod.n_pad == inn
        packed += 30 * mod.packed_bytes()
        theory += 30 * out * (inn * 4 + ng * (16 + 4)) / 8
    assert abs(packed / theory - 1) < 0.03
