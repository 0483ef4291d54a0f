"""Non-uniform codebooks: vectorized weighted k-means against a per-row loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import advisor.quantizers as q
from advisor.quantizers.nonuniform import fit_row_codebooks
from advisor.quantizers.synthetic import synthetic_layer


def slow_weighted_kmeans(x, w, init, n_iter):
    """One row, plain numpy: assign to the nearest centroid (ties to the lower), move each centroid to
    the weighted mean of its members, keep empty ones, stop when assignments do not change."""
    c = np.array(init, dtype=np.float64)

    def assign(c):
        mids = (c[1:] + c[:-1]) / 2
        return np.searchsorted(mids.astype(np.float32), x.astype(np.float32), side="left")

    a = assign(c)
    for _ in range(n_iter):
        for k in range(len(c)):
            m = a == k
            if w[m].sum() > 0:
                c[k] = (w[m] * x[m]).sum() / w[m].sum()
        c = np.sort(c)
        a2 = assign(c)
        if np.array_equal(a2, a):
            break
        a = a2
    return c


def test_fit_row_codebooks_matches_per_row_loop():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 200, generator=g, dtype=torch.float64).float()
    Wt = torch.rand(6, 200, generator=g).float() + 0.1
    init = torch.tensor(q.get_dtype("nf3").grid, dtype=torch.float32) * 2
    C, codes = fit_row_codebooks(X, Wt, init, n_iter=15)
    for r in range(6):
        ref = slow_weighted_kmeans(X[r].numpy().astype(np.float64), Wt[r].numpy().astype(np.float64),
                                   init.numpy(), 15)
        np.testing.assert_allclose(C[r].numpy(), np.sort(ref.astype(np.float16).astype(np.float32)),
                                   rtol=2e-3, atol=1e-3)
    # codes are nearest-codebook indices
    nearest = (X[..., None] - C[:, None, :]).abs().argmin(-1)
    assert (codes == nearest).float().mean() > 0.999


def test_fisher_replaces_hessian_diagonal():
    W, stats, _ = synthetic_layer(16, 128, seed=2)
    fisher = torch.rand(16, 128, generator=torch.Generator().manual_seed(3))
    a = q.get_method("nonuniform").quantize(W, "nonuniform:int3", stats)
    b = q.get_method("nonuniform").quantize(W, "nonuniform:int3", q.LayerStats(H=stats.H, fisher=fisher))
    assert a.info["sensitivity"] == "diag(H)" and b.info["sensitivity"] == "fisher"
    assert not torch.equal(a.table, b.table)
    err_f = lambda Wh: float((fisher * (W - Wh) ** 2).sum())  # noqa: E731
    assert err_f(b.dequantize()) <= err_f(a.dequantize())
    with pytest.raises(ValueError, match="fisher has shape"):
        q.get_method("nonuniform").quantize(W, "nonuniform:int3", q.LayerStats(H=stats.H, fisher=fisher[:, :5]))
