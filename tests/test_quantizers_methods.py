"""Conformance of every registered method over every data type it supports.

On a synthetic layer with a realistic calibration Hessian (correlated inputs, outlier channels):
codes in range, dequantized values exactly on the (scaled) grid, storage as ``bits_per_weight`` says,
and layer error ``tr(E H E^T)`` no larger than RTN's at the same spec. Tolerances: ``awq`` (RTN is one
of its candidates), ``gptq`` (except 2-bit: 15 %), ``quantease``, ``quantease-outlier``: none.
``nonuniform`` minimizes the
diagonal approximation ``sum_j H_jj e_ij^2`` and is held to that exactly (vs RTN, up to fp16 rounding of
its codebook); on the full objective it gets 10 %.
"""
from __future__ import annotations

import math

import pytest
import torch

import advisor.quantizers as q
from advisor.quantizers.grid import expand_groups
from advisor.quantizers.synthetic import synthetic_layer

OUT, IN = 24, 160  # 160 = 5 MX blocks; with g64 the last group is partial


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def layer():
    W, stats, _ = synthetic_layer(OUT, IN, seed=11)
    return W, stats


def _cases():
    cases = []
    for m in q.known_methods():
        method = q.get_method(m)
        for name, dt in sorted(q.DTYPES.items()):
            if dt.family not in method.dtype_families:
                continue
            group = None if dt.block_size else 64
            cases.append(f"{m}:{name}" + (f":g{group}" if group else ""))
            if dt.supports_asymmetric and method.supports_asymmetric and dt.bits <= 4:
                cases.append(f"{m}:{name}:g{group}:asym")
    return cases


CASES = _cases()
OPTIONS = {"quantease": ":it6", "quantease-outlier": ":o0.02:it6", "nonuniform": ":it10"}


def _spec(text):
    method = text.split(":")[0]
    return q.QuantSpec.parse(text + OPTIONS.get(method, ""))


_rtn_cache: dict = {}


def _rtn_error(layer, spec):
    W, stats = layer
    key = (spec.dtype, spec.group_size, spec.symmetric)
    if key not in _rtn_cache:
        rtn = q.QuantSpec("rtn", spec.dtype, spec.group_size, spec.symmetric)
        _rtn_cache[key] = q.layer_error(W, q.get_method("rtn").quantize(W, rtn).dequantize(), stats.H)
    return _rtn_cache[key]


@pytest.mark.parametrize("text", CASES)
def test_conformance(layer, text):
    W, stats = layer
    spec = _spec(text)
    dt = q.get_dtype(spec.dtype)
    qw = q.get_method(spec.method).quantize(W, spec, stats, name="layers.0.mlp.down_proj")

    # codes in range, shapes per INTERFACES.md
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (OUT, IN)
    assert int(qw.codes.max()) < 2**dt.bits
    g = qw.group_size
    assert g == (32 if dt.block_size else (spec.group_size or IN))
    assert qw.scales.shape == (OUT, math.ceil(IN / g)) and qw.scales.dtype == torch.float32
    assert (qw.offsets is None) == spec.symmetric
    assert qw.table.shape[-1] == 2**dt.bits

    # scales are what their stated storage holds
    if dt.scale_format == "e8m0":
        e = torch.log2(qw.scales)
        assert torch.equal(e, e.round()) and e.min() >= -127 and e.max() <= 127
    else:
        assert torch.equal(qw.scales, qw.scales.half().float())
    if qw.table.dim() == 2:
        assert torch.equal(qw.table, qw.table.half().float())

    # dequantized values lie exactly on the grid: (W_hat - offset) / scale is a table value
    grid_part = qw.dequantize()
    if qw.input_scale is not None:
        grid_part = grid_part * qw.input_scale[None, :]
    if qw.outliers is not None:
        idx, val = qw.outliers
        assert torch.equal(val, val.half().float())
        grid_part = grid_part.index_put((idx[:, 0], idx[:, 1]), -val, accumulate=True)
    s = expand_groups(qw.scales, g, IN)
    off = torch.zeros_like(s) if qw.offsets is None else expand_groups(qw.offsets, g, IN)
    if qw.offsets is not None:
        zp = -qw.offsets / qw.scales
        assert torch.allclose(zp, zp.round(), atol=1e-4) and zp.min() >= -1e-4 and zp.max() <= 2**dt.bits - 1 + 1e-4
    table = qw.table if qw.table.dim() == 2 else qw.table.expand(OUT, -1)
    unit = torch.gather(table, 1, qw.codes.long())
    torch.testing.assert_close(grid_part, unit * s + off, rtol=1e-6, atol=1e-7)
    if qw.table.dim() == 1:
        assert torch.equal(qw.table, dt.table_tensor(spec.symmetric))

    # storage: count what is stored and compare with the documented formula
    n = OUT * IN
    stored = dt.bits * n + qw.scales.numel() * (8 if dt.scale_format == "e8m0" else 16)
    if qw.offsets is not None:
        stored += dt.bits * qw.offsets.numel()  # integer zero points
    if qw.table.dim() == 2:
        stored += 16 * qw.table.numel()
    if qw.outliers is not None:
        stored += 48 * qw.outliers[1].numel()
    assert spec.bits_per_weight(IN) == pytest.approx(stored / n, abs=48 / n)

    # no worse than RTN on the layer objective
    err = q.layer_error(W, qw.dequantize(), stats.H)
    rtn_err = _rtn_error(layer, spec)
    if spec.method == "nonuniform":
        d = torch.diagonal(stats.H)
        rtn = q.get_method("rtn").quantize(W, q.QuantSpec("rtn", spec.dtype, spec.group_size)).dequantize()
        diag_err = float((((W - qw.dequantize()) ** 2) * d).sum())
        diag_rtn = float((((W - rtn) ** 2) * d).sum())
        assert diag_err <= diag_rtn * (1 + 1e-3)
        assert err <= rtn_err * 1.10
    elif spec.method == "gptq" and dt.bits == 2:
        # GPTQ's greedy compensation carries no guarantee against RTN; at 2 bits it can lose (here
        # int2 g64 asym: +9 %), as 2-bit GPTQ results in the literature also show
        assert err <= rtn_err * 1.15, (err, rtn_err)
    else:
        assert err <= rtn_err * (1 + 1e-6), (err, rtn_err)


def test_every_method_and_dtype_is_covered():
    methods = {c.split(":")[0] for c in CASES}
    dtypes = {c.split(":")[1] for c in CASES}
    assert methods == set(q.known_methods()) and dtypes == set(q.DTYPES)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "quantease", "quantease-outlier", "nonuniform"])
def test_nan_inf_reported_with_layer_name(layer, method):
    W, stats = layer
    spec = f"{method}:int4:g64"
    bad = W.clone()
    bad[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"layer model.layers.2.q_proj: weight contains 1 NaN and 0 Inf"):
        q.get_method(method).quantize(bad, spec, stats, name="model.layers.2.q_proj")
    if method == "rtn":
        return
    H = stats.H.clone()
    H[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"layer L: Hessian H contains 0 NaN and 1 Inf"):
        q.get_method(method).quantize(W, spec, q.LayerStats(H=H, act_abs_mean=stats.act_abs_mean), name="L")


def test_missing_or_misshaped_statistics(layer):
    W, stats = layer
    with pytest.raises(ValueError, match="needs the input Hessian"):
        q.get_method("gptq").quantize(W, "gptq:int4:g64", q.LayerStats(), name="L")
    with pytest.raises(ValueError, match="needs LayerStats.act_abs_mean"):
        q.get_method("awq").quantize(W, "awq:int4:g64", q.LayerStats(H=stats.H))
    with pytest.raises(ValueError, match=r"H has shape \(10, 10\), expected \(160, 160\)"):
        q.get_method("gptq").quantize(W, "gptq:int4:g64", q.LayerStats(H=torch.eye(10)))
    with pytest.raises(ValueError, match="is for method rtn, not gptq"):
        q.get_method("gptq").quantize(W, "rtn:int4", stats)


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match="unknown method 'quantese'.*known: awq, gptq, nonuniform, quantease, "
                                         "quantease-outlier, rtn"):
        q.get_method("quantese")


def test_methods_declare_requirements():
    for name in q.known_methods():
        m = q.get_method(name)
        assert m.description and m.requires <= {"hessian", "act_abs_mean"}
    assert q.get_method("rtn").requires == frozenset()
    assert q.get_method("awq").requires == {"hessian", "act_abs_mean"}


def test_awq_effective_weight_uses_input_scale(layer):
    W, stats = layer
    qw = q.get_method("awq").quantize(W, "awq:int4:g64", stats)
    assert qw.input_scale is not None and qw.input_scale.shape == (IN,)
    assert qw.info["alpha"] in [i / 20 for i in range(20)]
    assert len(qw.info["search_errors"]) == 20
    # alpha = 0 is RTN: the first search error is RTN's layer error
    assert qw.info["search_errors"][0] == pytest.approx(_rtn_error(layer, q.QuantSpec.parse("rtn:int4:g64")),
                                                        rel=1e-5)


def test_quantease_outlier_budget(layer):
    W, stats = layer
    qw = q.get_method("quantease-outlier").quantize(W, "quantease-outlier:int3:g64:it6", stats)
    idx, val = qw.outliers
    assert idx.shape[1] == 2 and idx.dtype == torch.long
    assert val.numel() <= round(0.01 * OUT * IN) and val.numel() > 0


PACK_CASES = [f"rtn:{n}" + ("" if q.get_dtype(n).block_size else ":g64") for n in sorted(q.DTYPES)] + [
    "gptq:int3:g64:asym", "awq:int4:g64", "quantease:int3:g64:it3", "quantease-outlier:int3:g64:it3",
    "nonuniform:nf4:g64", "rtn:int4",
]


@pytest.mark.slow  # numba compilation of the kernels takes minutes on the shared machine
@pytest.mark.parametrize("text", PACK_CASES)
def test_pack_reproduces_the_quantized_layer(layer, text):
    W, stats = layer
    qw = q.get_method(text.split(":")[0]).quantize(W, text, stats)
    bias = torch.linspace(-1, 1, OUT)
    ql = qw.pack(bias=bias)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ql(x), x @ qw.dequantize().t() + bias, rtol=1e-5, atol=1e-5)
    if qw.input_scale is None:
        assert torch.equal(ql.dequantize(), qw.dequantize())


def test_awq_with_gptq_option(layer):
    W, stats = layer
    plain = q.get_method("awq").quantize(W, "awq:int3:g64", stats)
    with_gptq = q.get_method("awq").quantize(W, "awq:int3:g64:gptq", stats)
    assert torch.equal(plain.input_scale, with_gptq.input_scale)
    err = q.layer_error(W, with_gptq.dequantize(), stats.H)
    assert err <= q.layer_error(W, plain.dequantize(), stats.H)
    assert err <= _rtn_error(layer, q.QuantSpec.parse("rtn:int3:g64"))
