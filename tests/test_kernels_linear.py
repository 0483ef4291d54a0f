"""Fast forward == slow reference (1e-5 relative), every format; decode batches and prefill.

The default run covers int4 (affine, fp16 offsets), fp6_e3m2 (ExMy bits, per channel) and nf4 /
per-row codebooks (16-value select); each other format needs its own numba specialization
(~10 s cold compile each), so those run under ``-m slow``.
"""
import warnings

import pytest
import torch

from advisor import kernels
from advisor.kernels import simd
from advisor.kernels.codebook import exmy_grid

warnings.filterwarnings("ignore", module="numba")
BATCHES = [1, 3, 8, 33]
BF16_TOL = 2e-2  # max error / max |y| of a bf16 GEMM (8-bit mantissas, fp32 accumulation)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _layer(bits, table, group, out=24, inn=320, offsets=False, seed=0, zero_points=False, **kw):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (out, inn), generator=g)
    ng = -(-inn // min(group, inn))
    scales = torch.rand(out, ng, generator=g) * 0.1 + 0.01
    offs = torch.randn(out, ng, generator=g) * 0.1 if offsets else None
    if zero_points:  # asymmetric ints as the quantizers make them: offset = -zero * scale
        scales = scales.half().float()
        offs = -torch.randint(0, 2 ** bits + 1, (out, ng), generator=g).float() * scales
    return kernels.pack_linear(codes, scales, offs, bits=bits, table=table, group_size=group, **kw)


def _check(mod, batches=BATCHES, seed=1, prefill=True):
    """Fast forward == reference for decode batches (and, with ``prefill``, the dequantize path
    used for > 8 tokens, a separate numba specialization costing ~6 s to compile cold)."""
    g = torch.Generator().manual_seed(seed)
    if not prefill:
        batches = [b for b in batches if b <= kernels.linear.MAX_FAST_BATCH]
    for b in batches:
        x = torch.randn(b, mod.in_features, generator=g)
        # more than MAX_FAST_BATCH tokens: bf16 activations and weights (BF16_TOL, see
        # test_prefill_runs_in_bf16_within_its_tolerance); the decode kernels are fp32
        tol = 1e-5 if b <= kernels.linear.MAX_FAST_BATCH else BF16_TOL
        assert _rel_err(mod(x), mod.reference_forward(x)) < tol, b
    x3 = torch.randn(2, 3, mod.in_features, generator=g)  # leading dims are kept
    assert mod(x3).shape == (2, 3, mod.out_features)
    if not prefill:
        return
    W = mod.reference_forward(torch.eye(mod.in_features)).T
    if mod.bias is not None:
        W = W - mod.bias[:, None]
    if hasattr(mod, "input_scale"):
        W = W * mod.input_scale[None, :]
    assert _rel_err(mod.dequantize(), W) < 1e-5


NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796,
                    0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])
FAST = {
    "int4_g128": dict(bits=4, table=torch.arange(16.0), group=128, offsets=True),
    "int4_odd_group_tail": dict(bits=4, table=torch.arange(16.0) - 8, group=128, inn=300,
                                zero_points=True),
    "int4_partial_last_group": dict(bits=4, table=torch.arange(16.0), group=128, inn=576,
                                    zero_points=True),
    "fp6_e3m2_per_channel": dict(bits=6, table=torch.tensor(exmy_grid(3, 2)).float(), group=10 ** 9),
    "fp6_odd_width": dict(bits=6, table=torch.tensor(exmy_grid(3, 2)).float(), group=10 ** 9,
                          inn=77, out=5),
    "nf4_g64": dict(bits=4, table=NF4, group=64),
    # the format recommend picks most often: bit planes; 320 wide -> 64-code tiles (8 per phase,
    # scalar kernel), 512 wide -> 128-code tiles (explicit SIMD, multiply gather)
    "int3_g128": dict(bits=3, table=torch.arange(8.0), group=128, zero_points=True),
    "int3_g128_simd": dict(bits=3, table=torch.arange(8.0), group=128, zero_points=True, inn=512),
    # 512 wide: 256-code tiles, so FP6 takes the explicit-SIMD kernel (the 320 case above does not)
    "fp6_e3m2_simd": dict(bits=6, table=torch.tensor(exmy_grid(3, 2)).float(), group=10 ** 9,
                          inn=512, out=40),
}
SLOW = {
    "int2_g128": dict(bits=2, table=torch.arange(4.0), group=128, zero_points=True),
    "int8_g128": dict(bits=8, table=torch.arange(256.0) - 128, group=128),
    "fp8_e4m3": dict(bits=8, table=torch.tensor(exmy_grid(4, 3)).float(), group=10 ** 9),
    "fp4_e2m1_g128": dict(bits=4, table=torch.tensor(exmy_grid(2, 1)).float(), group=128),
    "mxfp4": dict(bits=4, table=torch.tensor(exmy_grid(2, 1)).float(), group=32, mx=True),
    "mxint8": dict(bits=8, table=(torch.arange(256.0) - 128) / 64, group=32, mx=True),
    "int5_planes": dict(bits=5, table=torch.arange(32.0), group=64, offsets=True),
    "codebook64_gather": dict(bits=6, table=torch.randn(24, 64), group=64),
    "fp32_scales": dict(bits=4, table=torch.arange(16.0), group=128, offsets=True,
                        meta={"scale_dtype": "float32"}),
    "fp6_e2m3_simd": dict(bits=6, table=torch.tensor(exmy_grid(2, 3)).float() * 0.5, group=128,
                          inn=512, offsets=True),
    "int8_per_channel_simd": dict(bits=8, table=torch.arange(256.0), group=10 ** 9, inn=512,
                                  zero_points=True),
}

# Which decode batches run the explicit-SIMD kernel (kernels/simd.py) and which the
# auto-vectorized scalar one; both are checked against the reference above.
SIMD_EXPECTED = {"int4_g128": True, "int4_odd_group_tail": True, "int4_partial_last_group": True,
                 "fp6_e3m2_per_channel": False, "fp6_odd_width": False, "nf4_g64": True,
                 "fp6_e3m2_simd": True, "int3_g128": False,
                 "int3_g128_simd": True}


def _build(spec):
    spec = dict(spec)
    mx = spec.pop("mx", False)
    if mx:
        out, inn, group = spec.pop("out", 24), spec.pop("inn", 320), spec.pop("group")
        codes = torch.randint(0, 2 ** spec["bits"], (out, inn))
        scales = torch.exp2(torch.randint(-6, 3, (out, inn // group)).float())
        return kernels.pack_linear(codes, scales, None, bits=spec["bits"], table=spec["table"],
                                   group_size=group, meta={"scale_pow2": True})
    return _layer(spec.pop("bits"), spec.pop("table"), spec.pop("group"), **spec)


@pytest.mark.parametrize("name", list(FAST))
def test_fast_forward_matches_reference(name):
    # default run: the prefill/dequantize kernel only for int4 (keeps cold compiles under a minute)
    _check(_build(FAST[name]), prefill=name == "int4_g128")


# Which batch-1 forwards take the wide FP6 kernel (6-bit codes exact in bf16, 128k-code tiles).
WIDE_EXPECTED = {"int4_g128": False, "int4_odd_group_tail": False,
                 "int4_partial_last_group": False, "fp6_e3m2_per_channel": False,
                 "fp6_odd_width": False, "nf4_g64": False,
                 "fp6_e3m2_simd": simd.ISA == "avx512",  # vpermi2w: AVX-512 only
                 "int3_g128": False, "int3_g128_simd": False}


def _qgemv(mod, x, mode, vdec):
    from advisor.kernels import cpu

    f = mod._fast_args()
    unit = cpu.WIDE_UNIT if mode == 2 else kernels.int_pack.UNIT[mod.layout]
    xp, xsum = cpu.phase_order(x.numpy(), mod.n_pad, mod.tile, unit, mod.group_size,
                               mod.n_groups)
    y = torch.empty(x.shape[0], mod.out_features).numpy()
    cpu.qgemv(f["packed"], xp, xsum, y, vdec, mode)
    return torch.from_numpy(y)


def test_simd_path_coverage_and_agreement_with_scalar_path():
    """The explicit-SIMD batch-1 kernels are taken where expected and equal the scalar kernel."""
    for name, expected in SIMD_EXPECTED.items():
        mod = _build(FAST[name])
        f = mod._fast_args()
        assert f["simd"] is expected, name
        assert f["wide"] is WIDE_EXPECTED[name], name
        x = torch.randn(1, mod.in_features)
        y0 = _qgemv(mod, x, 0, f["vdec"])
        if f["simd"]:
            assert _rel_err(_qgemv(mod, x, 1, f["vdec"]), y0) < 1e-5, name
        if f["wide"]:
            assert _rel_err(_qgemv(mod, x, 2, f["wdec"]), y0) < 1e-5, name


def test_wide_fp6_kernel_formats_and_generic_decode():
    """Wide FP6 kernel (bf16 tables): E2M3 with offsets and groups, int6, per-row 6-bit
    codebooks exact in bf16 (and one that is not: no wide kernel), and the generic 32-bit FP6
    decode (the float descriptor passed to qgemv directly) against the reference."""
    g = torch.Generator().manual_seed(5)
    bf16_rows = torch.randn(5, 64, generator=g).bfloat16().float()
    specs = [(dict(bits=6, table=torch.tensor(exmy_grid(2, 3)).float() * 0.5, group=128, out=5,
                   inn=384, offsets=True), True),
             (dict(bits=6, table=torch.arange(64.0) - 32, group=256, out=3, inn=512,
                   zero_points=True), True),
             (dict(bits=6, table=bf16_rows, group=128, out=5, inn=256), True),
             (dict(bits=6, table=torch.randn(5, 64, generator=g), group=128, out=5, inn=256),
              False)]
    for spec, wide in specs:
        mod = _build(spec)
        f = mod._fast_args()
        assert f["wide"] is (wide and simd.ISA == "avx512")  # vpermi2w: AVX-512 only
        assert (f["wdec"] is not None) is wide
        x = torch.randn(1, mod.in_features, generator=g)
        ref = mod.reference_forward(x)
        assert _rel_err(mod(x), ref) < 1e-5
        if wide:  # also off AVX-512, where the lookup is per lane (QuantLinear does not take it)
            assert _rel_err(_qgemv(mod, x, 2, f["wdec"]), ref) < 1e-5
    mod = _build(specs[0][0])  # the path's FP6 decode (32-entry lookup + sign, or ExMy bits)
    x = torch.randn(1, mod.in_features, generator=g)
    assert _rel_err(_qgemv(mod, x, 2, mod._fast_args()["vdec"]), mod.reference_forward(x)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAST))
def test_prefill_and_dequantize_match_reference(name):
    _check(_build(FAST[name]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_fast_forward_matches_reference_all_formats(name):
    _check(_build(SLOW[name]))


def test_per_row_codebook_outliers_input_scale_bias():
    g = torch.Generator().manual_seed(3)
    out, inn = 16, 256
    table = torch.sort(torch.randn(out, 16, generator=g), dim=1).values  # per-row codebooks
    nnz = 20
    idx = torch.stack([torch.randint(0, out, (nnz,), generator=g),
                       torch.randint(0, inn, (nnz,), generator=g)], 1)
    mod = _layer(4, table, 64, out=out, inn=inn,
                 outliers=(idx, torch.randn(nnz, generator=g) * 5), bias=torch.randn(out),
                 meta={"input_scale": torch.rand(inn, generator=g) + 0.5})
    assert mod._fast_args()["decode"].kind == "lut16"
    _check(mod, prefill=False)
    # the reference is independent of the module: rebuild W from the raw pieces
    x = torch.randn(2, inn, generator=g)
    W = mod.reference_forward(torch.diag(mod.input_scale)).T - mod.bias[:, None]
    ref = (x / mod.input_scale) @ W.T + mod.bias
    assert _rel_err(mod(x), ref) < 1e-5


def test_state_dict_roundtrip_and_device_agnostic_path():
    mod = _build(FAST["int4_g128"])
    clone = kernels.QuantLinear(mod.config)
    clone.load_state_dict(mod.state_dict())
    x = torch.randn(3, mod.in_features)
    assert torch.equal(clone(x), mod(x))
    assert _rel_err(mod._dequantize_torch(), mod.dequantize()) < 1e-6


def test_fast_path_never_materializes_fp32_for_decode(monkeypatch):
    mod = _build(FAST["int4_g128"])

    def boom(*a, **k):
        raise AssertionError("decode must not dequantize the whole matrix")

    monkeypatch.setattr(mod, "dequantize", boom)
    monkeypatch.setattr(mod, "_dequantize_torch", boom)
    mod(torch.randn(8, mod.in_features))


def test_forward_keeps_the_callers_torch_thread_count():
    mod = _build(FAST["int4_g128"])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        mod(torch.randn(1, mod.in_features))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


def test_decode_runs_on_torchs_openmp_team_and_agrees_with_own_threads(monkeypatch):
    """The batch-1..8 kernel runs on torch's OpenMP team (kernels.team) when torch is built on
    OpenMP; the fallback with the kernel's own helper threads gives the same numbers, bit for bit
    (each output row is computed by exactly one thread either way)."""
    from advisor.kernels import team

    if "OpenMP" in torch.__config__.parallel_info():
        assert team.available(), "torch runs on OpenMP but GOMP_parallel was not found"
    mod = _build(dict(FAST["int4_g128"], out=200))  # 13 row tasks: both threads get work
    g = torch.Generator().manual_seed(3)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for b in (1, 5):
            x = torch.randn(b, mod.in_features, generator=g)
            y_team = mod(x)
            monkeypatch.setattr(team, "available", lambda: False)
            y_own = mod(x)
            monkeypatch.undo()
            assert torch.equal(y_team, y_own)
            assert _rel_err(y_team, mod.reference_forward(x)) < 1e-5
    finally:
        torch.set_num_threads(n)
