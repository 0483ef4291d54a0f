"""QuantEase and its outlier-aware variant against slow, literal per-coordinate references."""
from __future__ import annotations

import pytest
import torch

import advisor.quantizers as q
from advisor.quantizers.gptq import gptq_quantize_weight
from advisor.quantizers.grid import compute_grid_params, expand_groups, round_to_grid
from advisor.quantizers.quantease import is_rounding_pass, quantease_quantize_weight
from advisor.quantizers.quantease_outlier import quantease_outlier_quantize_weight
from advisor.quantizers.synthetic import synthetic_layer


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(out, inp, seed):
    W, stats, _ = synthetic_layer(out, inp, seed=seed)
    return W.double(), stats.H.double()


def _objective(E, S):
    return float(((E @ S) * E).sum())


def _round_col(params, j, u):
    s = params.scales[:, j // params.group_size]
    zp = None if params.zero_points is None else params.zero_points[:, j // params.group_size]
    return round_to_grid(u, params.rounder, s, zp)


def slow_quantease(W, S, params, n_iter, order=None, W0=None):
    """Paper Lemma 1 applied literally: for each column, beta = W_hat_j + ((W - W_hat) S)_j / S_jj with
    the full products recomputed, rounded to the column's fixed grid on rounding passes. Returns the
    best rounded iterate (codes, W_hat)."""
    out, n = W.shape
    order = range(n) if order is None else order.tolist()
    What = W.clone() if W0 is None else W0.clone()
    codes = torch.zeros(out, n, dtype=torch.long)
    best = (float("inf"), None, None)
    for it in range(n_iter):
        rnd = it % 3 != 1 or it == n_iter - 1 or it > 25
        for j in order:
            u = What[:, j] if S[j, j] == 0 else What[:, j] + ((W - What) @ S[:, j]) / S[j, j]
            if rnd or S[j, j] == 0:
                codes[:, j], u = _round_col(params, j, u)
            What[:, j] = u
        if rnd:
            f = _objective(W - What, S)
            if f < best[0]:
                best = (f, codes.clone(), What.clone())
    return best[1], best[2]


def test_schedule_matches_reference():
    relax = [it for it in range(30) if not is_rounding_pass(it, 30)]
    assert relax == [1, 4, 7, 10, 13, 16, 19, 22, 25]
    assert is_rounding_pass(0, 30) and is_rounding_pass(29, 30) and is_rounding_pass(1, 2)


@pytest.mark.parametrize("dtype,group,sym,act", [
    ("int3", 32, True, False), ("int4", None, False, False), ("int3", 24, False, True),
    ("nf4", 32, True, False), ("mxfp4", None, True, False), ("fp6_e2m3", 40, True, True),
])
def test_quantease_matches_slow_reference(dtype, group, sym, act):
    W, S = _layer(12, 96, seed=3)
    S[7, :] = 0  # a dead input exercises the S_jj = 0 branch
    S[:, 7] = 0
    dt = q.get_dtype(dtype)
    params = compute_grid_params(W, dt, group, sym)
    codes, p, What, info = quantease_quantize_weight(W, S, dt, group, sym, n_iter=7, act_order=act)
    order = torch.argsort(torch.diagonal(S), descending=True) if act else None
    ref_codes, ref_What = slow_quantease(W, S, params, 7, order)
    assert torch.equal(p.scales, params.scales)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(What, ref_What, rtol=0, atol=1e-12)
    assert info["best_pass"] >= 0 and len(info["objective_per_pass"]) == 7


def test_quantease_lazy_blocks_cross_boundaries():
    W, S = _layer(8, 300, seed=4)  # 300 columns: blocks of 128, 128, 44
    dt = q.get_dtype("int4")
    params = compute_grid_params(W, dt, 64)
    codes, _, What, _ = quantease_quantize_weight(W, S, dt, 64, n_iter=3)
    ref_codes, ref_What = slow_quantease(W, S, params, 3)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(What, ref_What, rtol=0, atol=1e-11)


def test_quantease_gptq_init_never_worse_than_gptq():
    W, S = _layer(32, 128, seed=5)
    dt = q.get_dtype("int3")
    _, _, Qg = gptq_quantize_weight(W, S, dt, 32)
    _, params, What, info = quantease_quantize_weight(W, S, dt, 32, n_iter=6, gptq_init=True)
    assert _objective(W - What, S) <= _objective(W - Qg, S)
    ref_codes, ref_What = slow_quantease(W, S, params, 6, W0=Qg)
    f_ref = min(_objective(W - ref_What, S), _objective(W - Qg, S))
    assert _objective(W - What, S) == pytest.approx(f_ref, rel=1e-12)


def slow_quantease_outlier(W, S, dt, group, sym, frac, n_iter, order=None):
    out, n = W.shape
    order = range(n) if order is None else order.tolist()
    k = int(round(frac * out * n))
    flat = W.reshape(-1)
    idx = flat.abs().topk(k).indices
    Hs = torch.zeros_like(flat)
    Hs[idx] = flat[idx]
    Hs = Hs.view_as(W)
    params = compute_grid_params(W, dt, group, sym, exclude=Hs != 0)
    step = 1.0 / (2 * float(torch.linalg.eigvalsh(S)[-1]))
    What = W - Hs
    codes = torch.zeros(out, n, dtype=torch.long)
    best = (float("inf"), None, None, None)
    for it in range(n_iter):
        rnd = it % 3 != 1 or it == n_iter - 1 or it > 25
        T = W - Hs
        for j in order:
            u = What[:, j] if S[j, j] == 0 else What[:, j] + ((T - What) @ S[:, j]) / S[j, j]
            if rnd or S[j, j] == 0:
                codes[:, j], u = _round_col(params, j, u)
            What[:, j] = u
        G = Hs - step * ((What + Hs - W) @ S)  # gradient step on the sparse part
        keep = G.reshape(-1).abs().topk(k).indices
        Hs = torch.zeros(out * n, dtype=W.dtype)
        Hs[keep] = G.reshape(-1)[keep]
        Hs = Hs.view_as(W).half().double()
        if rnd:
            f = _objective(W - What - Hs, S)
            if f < best[0]:
                best = (f, codes.clone(), What.clone(), Hs.clone())
    return best[1:]


@pytest.mark.parametrize("dtype,group,act", [("int3", 32, False), ("int4", None, True), ("mxint4", None, False)])
def test_quantease_outlier_matches_slow_reference(dtype, group, act):
    W, S = _layer(12, 96, seed=6)
    dt = q.get_dtype(dtype)
    codes, _, Q, Hs, info = quantease_outlier_quantize_weight(W, S, dt, group, outlier_fraction=0.02, n_iter=5,
                                                              act_order=act)
    order = torch.argsort(torch.diagonal(S), descending=True) if act else None
    ref_codes, ref_Q, ref_Hs = slow_quantease_outlier(W, S, dt, group, True, 0.02, 5, order)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(Q, ref_Q, rtol=0, atol=1e-11)
    torch.testing.assert_close(Hs, ref_Hs, rtol=0, atol=1e-11)
    assert int((Hs != 0).sum()) <= round(0.02 * W.numel()) == info["outlier_budget"]


def test_outliers_help_at_three_bits():
    W, stats, _ = synthetic_layer(64, 256, seed=7)
    base = q.get_method("quantease").quantize(W, "quantease:int3:g128:it10", stats).dequantize()
    outl = q.get_method("quantease-outlier").quantize(W, "quantease-outlier:int3:g128:it10", stats).dequantize()
    assert q.layer_error(W, outl, stats.H) < 0.8 * q.layer_error(W, base, stats.H)


@pytest.mark.parametrize("dtype,group,sym", [("int3", 128, True), ("int4", 64, False), ("nf4", None, True),
                                             ("fp8_e4m3", 32, True), ("mxfp6_e3m2", None, True)])
def test_compiled_cd_block_equals_torch_reference(dtype, group, sym):
    """The numba block kernel and the torch column loop do the same float32 arithmetic."""
    from advisor.quantizers.quantease import CDState

    W, stats, _ = synthetic_layer(32, 200, seed=8)
    dt = q.get_dtype(dtype)
    params = compute_grid_params(W, dt, group, sym)
    results = []
    for compiled in (True, False):
        state = CDState(params, stats.H, None, 32)
        What_t = W.t().contiguous().clone()
        codes_t = torch.zeros(200, 32, dtype=torch.long)
        P_t = state.S @ W.t()
        for it in range(4):
            G_t = P_t - state.S @ What_t
            state.cd_pass(What_t, G_t, codes_t, is_rounding_pass(it, 4), compiled=compiled)
        results.append((What_t, codes_t))
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-9)
