"""Kernel code paths per instruction set, and which computation QuantLinear.forward runs.

Every ISA path the host can run is forced in a fresh process (``ADVISOR_KERNEL_ISA``) and
checked against the reference forward (slow: each path compiles its own kernels; numba caches
them per path, so a second run is fast). The path choice, the cache separation and the
forward dispatch (packed kernels / bf16 prefill / CUDA int4 layout) are checked by default.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from advisor import kernels
from advisor.kernels import cpu, simd
from advisor.kernels.codebook import exmy_grid

warnings.filterwarnings("ignore", module="numba")
AVX512 = {"avx512f": True, "avx512bw": True, "avx2": True, "fma": True}
AVX2 = {"avx2": True, "fma": True}


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_isa_choice_from_host_features_and_override(monkeypatch):
    monkeypatch.delenv(simd.ISA_ENV, raising=False)
    assert simd.runnable_paths(AVX512) == ["avx512", "avx2", "portable"]
    assert simd.runnable_paths(AVX2) == ["avx2", "portable"]
    assert simd.runnable_paths({}) == ["portable"]  # e.g. ARM: LLVM reports no x86 features
    assert simd.select_isa(None, AVX512) == "avx512"
    assert simd.select_isa(None, AVX2) == "avx2"
    assert simd.select_isa("portable", AVX512) == "portable"
    assert simd.select_isa("auto", AVX2) == "avx2"
    monkeypatch.setenv(simd.ISA_ENV, "avx2")
    assert simd.select_isa(None, AVX512) == "avx2"
    with pytest.raises(ValueError, match="error: ADVISOR_KERNEL_ISA=avx512 needs CPU features"):
        simd.select_isa("avx512", AVX2)
    with pytest.raises(ValueError, match="is not a kernel path"):
        simd.select_isa("sse9", AVX512)
    assert simd.ISA in simd.runnable_paths()


def test_compiled_kernels_are_cached_per_isa_path():
    """numba's cache key does not see the ISA global the intrinsics read, so the package keeps
    one cache folder per path."""
    for fn in (cpu._gemv_work_nib4, cpu._gemv_b1_split6, cpu._dequant_work_planes):
        path = fn._cache._cache_path
        assert os.path.basename(path) == f"isa-{simd.ISA}", path


_FORCED = r"""
import sys, torch
from advisor import kernels
from advisor.kernels import simd
from advisor.kernels.codebook import exmy_grid
assert simd.ISA == sys.argv[1], (simd.ISA, sys.argv[1])
nf4 = torch.linspace(-1, 1, 16) ** 3
layers = {
    "int4": (4, torch.arange(16.0), 128, True), "int3": (3, torch.arange(8.0), 128, True),
    "int2": (2, torch.arange(4.0), 64, True), "nf4": (4, nf4, 64, False),
    "fp4": (4, torch.tensor(exmy_grid(2, 1)).float(), 128, False),
    "fp6": (6, torch.tensor(exmy_grid(3, 2)).float(), 512, False),
    "int8": (8, torch.arange(256.0) - 128, 128, False),
}
g = torch.Generator().manual_seed(0)
for name, (bits, table, group, asym) in layers.items():
    codes = torch.randint(0, 2 ** bits, (40, 512), generator=g)
    scales = torch.rand(40, 512 // group, generator=g) * 0.1 + 0.01
    offs = -scales * 2 if asym else None
    m = kernels.pack_linear(codes, scales, offs, bits=bits, table=table, group_size=group)
    for b in (1, 4):
        x = torch.randn(b, 512, generator=g)
        r = m.reference_forward(x)
        err = float((m(x) - r).abs().max() / r.abs().max())
        assert err < 1e-5, (name, b, err)
print("ok", simd.ISA)
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", simd.ISA_PATHS)
def test_each_runnable_isa_path_matches_reference(isa, tmp_path):
    if isa not in simd.runnable_paths():
        pytest.skip(f"this host cannot run the {isa} path")
    env = dict(os.environ, **{simd.ISA_ENV: isa})
    out = subprocess.run([sys.executable, "-c", _FORCED, isa], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ok {isa}" in out.stdout


_CACHED = r"""
import json, torch
from advisor import kernels
from advisor.kernels import cpu
g = torch.Generator().manual_seed(0)
m = kernels.pack_linear(torch.randint(0, 16, (40, 512), generator=g), torch.rand(40, 4) + 0.1,
                        None, bits=4, table=torch.arange(16.0), group_size=128)
for b in (1, 3):
    m(torch.randn(b, 512, generator=g))
s = cpu._gemv_work_nib4.stats
print(json.dumps([sum(s.cache_hits.values()), sum(s.cache_misses.values())]))
"""


@pytest.mark.slow
def test_template_made_entry_points_load_from_numbas_disk_cache(tmp_path):
    """The per-layout entry points are made from one template at import; numba must still find
    them in its disk cache: a second process compiles nothing."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _CACHED], env=env, cwd=tmp_path,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    (hits0, misses0), (hits1, misses1) = runs
    assert misses0 > 0 and hits0 == 0
    assert hits1 > 0 and misses1 == 0


def test_unrunnable_isa_request_is_one_clear_error(tmp_path):
    if "avx512" in simd.runnable_paths():
        pytest.skip("this host runs every path")
    env = dict(os.environ, **{simd.ISA_ENV: "avx512"})
    out = subprocess.run([sys.executable, "-c", "import advisor.kernels.simd"], env=env,
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "error: ADVISOR_KERNEL_ISA=avx512 needs" in out.stderr


def _int4(out=16, inn=1024, group=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inn), generator=g)
    scales = (torch.rand(out, inn // group, generator=g) * 0.1 + 0.01).half().float()
    offs = -torch.randint(0, 17, scales.shape, generator=g).float() * scales
    return kernels.pack_linear(codes, scales, offs, bits=4, table=torch.arange(16.0),
                               group_size=group)


def test_forward_path_per_batch_and_device():
    mod = _int4()
    prefill = "dequant_bf16" if kernels.linear.native_bf16_gemm() else "dequant_fp32"
    assert [mod.forward_path(b) for b in (1, 8, 9, 512)] == ["packed", "packed", prefill, prefill]
    assert mod.forward_path(1, "cuda") == "cuda_int4"
    assert mod.forward_path(1, "mps") == "dequant_bf16"
    nf4 = kernels.pack_linear(torch.randint(0, 16, (16, 1024)), torch.rand(16, 8), None, bits=4,
                              table=torch.linspace(-1, 1, 16) ** 3, group_size=128)
    assert nf4.forward_path(1, "cuda") == "dequant_bf16"  # not an affine int4 grid
    odd = _int4(inn=512)
    assert odd.forward_path(1, "cuda") == "dequant_bf16"  # torch's CUDA layout needs in % 1024
    never = kernels.pack_linear(torch.randint(0, 16, (4, 20)), torch.rand(4, 4), None, bits=4,
                                table=torch.arange(16.0), group_size=5)
    assert never.forward_path(1) == "dequant_fp32"  # group of 5: no packed kernel


def test_int4_tinygemm_layout_reproduces_the_weight_and_torchs_kernel():
    """The (code - 8) * scale + zero form handed to torch's int4 kernels equals the dequantized
    weight; torch's CPU int4 kernel with it matches the reference within bf16 tolerance (the
    CUDA kernel takes the same convention)."""
    mod = _int4(out=32)
    codes, sz = mod.int4_tinygemm_params()
    col = torch.arange(mod.in_features) // mod.group_size
    W = (codes.float() - 8) * sz[:, :, 0].T[:, col] + sz[:, :, 1].T[:, col]
    assert _rel_err(W, mod.dequantize()) < 1e-6
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 kernel")
    wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    x = torch.randn(3, mod.in_features)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), wp, mod.group_size,
                                                   sz.bfloat16()).float()
    assert _rel_err(y, mod.reference_forward(x)) < 2e-2
    per_row = kernels.pack_linear(torch.randint(0, 16, (4, 256)), torch.rand(4, 2), None,
                                  bits=4, table=torch.rand(4, 16), group_size=128)
    assert per_row.int4_tinygemm_params() is None


def test_accelerator_fallback_dequantizes_once_into_bf16(monkeypatch):
    """What a GPU without a usable int4 kernel runs, on CPU tensors: one bf16 dequantize per
    forward, never the fp32 dequantize-matmul."""
    mod = kernels.pack_linear(torch.randint(0, 16, (24, 256)), torch.rand(24, 2) * 0.1, None,
                              bits=4, table=torch.linspace(-1, 1, 16) ** 3, group_size=128)
    calls = []
    real = mod._dequantize_bf16
    monkeypatch.setattr(mod, "_dequantize_bf16", lambda: calls.append(1) or real())
    monkeypatch.setattr(mod, "forward_path", lambda n, device="cpu": "dequant_bf16")
    x = torch.randn(5, 256)
    y = mod(x)
    assert calls == [1]
    assert _rel_err(y, mod.reference_forward(x)) < 2e-2


def test_cuda_int4_falls_back_for_good_when_the_kernel_refuses(monkeypatch):
    mod = _int4()

    def refuse(*a, **k):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(torch.ops.aten, "_convert_weight_to_int4pack", refuse, raising=False)
    x = torch.randn(2, mod.in_features)
    y = mod._cuda_int4(x)
    assert mod._cuda_int4_state == "failed" and mod.forward_path(1, "cuda") == "dequant_bf16"
    assert _rel_err(y, mod.reference_forward(x)) < 2e-2


def test_prefill_runs_in_bf16_within_its_tolerance(monkeypatch):
    """More than MAX_FAST_BATCH tokens on a CPU with native bf16: bf16 activations and weights,
    fp32 accumulation; the error against the fp32 reference stays within 2e-2 of the largest
    output, every format family (its effect on a model's perplexity: tests/test_pipeline.py)."""
    monkeypatch.setattr(kernels.linear, "native_bf16_gemm", lambda: True)
    g = torch.Generator().manual_seed(2)
    for bits, table in ((4, torch.arange(16.0)), (6, torch.tensor(exmy_grid(3, 2)).float())):
        mod = kernels.pack_linear(torch.randint(0, 2 ** bits, (32, 256), generator=g),
                                  torch.rand(32, 2, generator=g) * 0.1, None, bits=bits,
                                  table=table, group_size=128)
        x = torch.randn(40, 256, generator=g)
        assert mod.forward_path(40) == "dequant_bf16"
        assert _rel_err(mod(x), mod.reference_forward(x)) < 2e-2


def test_prefill_runs_in_fp32_without_native_bf16(monkeypatch):
    """More than MAX_FAST_BATCH tokens on a CPU without native bf16 (where torch's bf16 GEMM is
    slower than fp32): one fast dequantize into fp32, then an fp32 GEMM, equal to the reference."""
    monkeypatch.setattr(kernels.linear, "native_bf16_gemm", lambda: False)
    mod = _int4(out=32)
    calls = []
    real = mod.dequantize
    monkeypatch.setattr(mod, "dequantize", lambda: calls.append(1) or real())
    x = torch.randn(40, mod.in_features)
    assert mod.forward_path(40) == "dequant_fp32"
    assert _rel_err(mod(x), mod.reference_forward(x)) < 1e-5
    assert calls == [1]


def test_native_bf16_is_read_from_the_cpu_features(monkeypatch):
    kernels.linear.native_bf16_gemm.cache_clear()
    try:
        monkeypatch.setattr(simd, "host_features", lambda: {"avx2": True, "avx512bf16": False})
        assert not kernels.linear.native_bf16_gemm()
        kernels.linear.native_bf16_gemm.cache_clear()
        monkeypatch.setattr(simd, "host_features", lambda: {"avx512f": True, "avx512bf16": True})
        assert kernels.linear.native_bf16_gemm()
    finally:
        kernels.linear.native_bf16_gemm.cache_clear()


def test_opt_in_torch_int4_cpu_kernel(monkeypatch):
    """ADVISOR_KERNEL_INT4=torch: int4 layers that fit torch's layout run its CPU int4 kernel at
    every batch (bf16 activations, within the bf16 tolerance); other layers are unaffected."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 kernel")
    mod = _int4(out=32)
    assert mod.forward_path(1) == "packed"
    monkeypatch.setenv(kernels.linear.INT4_ENV, "torch")
    assert _int4(out=24).forward_path(1) == "packed"  # torch's CPU layout needs out % 16 == 0
    assert mod.forward_path(1) == mod.forward_path(64) == "torch_int4"
    for b in (1, 8, 20):
        x = torch.randn(b, mod.in_features)
        assert _rel_err(mod(x), mod.reference_forward(x)) < 2e-2
    nf4 = kernels.pack_linear(torch.randint(0, 16, (16, 256)), torch.rand(16, 2), None, bits=4,
                              table=torch.linspace(-1, 1, 16) ** 3, group_size=128)
    assert nf4.forward_path(1) == "packed"
