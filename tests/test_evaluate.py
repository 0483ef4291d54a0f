from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from advisor.models.data import Windows
from advisor.models.evaluate import perplexity
from tests.conftest import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_perplexity_is_exp_of_mean_nll_by_hand(arch):
    model = tiny_model(arch)
    torch.manual_seed(1)
    ids = torch.randint(0, 90, (3, 16))
    result = perplexity(model, Windows(ids, {"seq_len": 16}), progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in ids:  # one window at a time, token by token
            logits = model(w[None]).logits[0]
            for t in range(15):
                total += -F.log_softmax(logits[t], -1)[w[t + 1]].item()
                count += 1
    assert result.n_tokens == count
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_batch_size_does_not_change_result():
    model = tiny_model("llama")
    ids = torch.randint(0, 90, (5, 16), generator=torch.Generator().manual_seed(3))
    a = perplexity(model, Windows(ids), batch_size=1, progress=False)
    b = perplexity(model, Windows(ids), batch_size=4, progress=False)
    assert a.nll == pytest.approx(b.nll, rel=1e-5)


def _full_kl_by_hand(ref_model, model, ids):
    """Per-token KL(P_ref || Q) from the full distributions, a window at a time."""
    out = []
    with torch.no_grad():
        for w in ids:
            lp = F.log_softmax(ref_model(w[None]).logits[0, :-1].double(), -1)
            lq = F.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            out.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.stack(out)


def test_kl_statistics_agree_with_the_full_distributions():
    from advisor.models.evaluate import paired_se

    ref, other = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = torch.randint(0, 90, (4, 16), generator=torch.Generator().manual_seed(5))
    w = Windows(ids, {"seq_len": 16})
    exact = _full_kl_by_hand(ref, other, ids)
    base_full = perplexity(ref, w, progress=False, top_k=96)  # the whole vocabulary: exact
    r = perplexity(other, w, progress=False, reference=base_full.reference)
    assert r.kld.mean == pytest.approx(exact.mean().item(), rel=2e-3)  # float32 against float64
    assert r.kld.max == pytest.approx(exact.max().item(), rel=2e-3)
    assert r.kld.median == pytest.approx(exact.reshape(-1).median().item(), rel=5e-3)
    assert r.kld.se == pytest.approx((exact.mean(1).std() / 2).item(), rel=5e-3)
    assert r.kld.n_tokens == 4 * 15
    # a truncated reference never overstates the KL (on a random model's flat distributions it is far below)
    base_k = perplexity(ref, w, progress=False, top_k=8)
    rk = perplexity(other, w, progress=False, reference=base_k.reference)
    assert 0 < rk.kld.mean <= r.kld.mean * (1 + 1e-6) and rk.kld.max <= r.kld.max * (1 + 1e-6)
    # same-top rate and |dp| by hand
    with torch.no_grad():
        lp = F.log_softmax(ref(ids).logits[:, :-1].double(), -1)
        lq = F.log_softmax(other(ids).logits[:, :-1].double(), -1)
    assert r.kld.same_top_rate == pytest.approx((lp.argmax(-1) == lq.argmax(-1)).double().mean().item())
    tgt = ids[:, 1:, None]
    dp = (lq.gather(-1, tgt).exp() - lp.gather(-1, tgt).exp()).abs().mean().item()
    assert r.kld.mean_abs_dp == pytest.approx(dp, rel=1e-4)
    # the paired standard error of dL is over the windows
    d = torch.tensor(r.window_nll, dtype=torch.float64) - torch.tensor(base_full.window_nll, dtype=torch.float64)
    assert paired_se(r.window_nll, base_full.window_nll) == pytest.approx((d.std() / 2).item())
    # a model against itself: no divergence
    same = perplexity(ref, w, progress=False, reference=base_full.reference)
    assert same.kld.mean == pytest.approx(0, abs=1e-6) and same.kld.same_top_rate == 1.0


def test_staged_measurement_equals_one_pass():
    """A sequential test measures windows in stages: the stages together are the one-pass measurement."""
    from advisor.models.evaluate import extend_reference

    ref, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.randint(0, 90, (5, 16), generator=torch.Generator().manual_seed(6))
    w = Windows(ids, {"seq_len": 16})
    whole = perplexity(ref, w, progress=False, top_k=16)
    a = perplexity(ref, w, progress=False, top_k=16, stop=2)
    b = perplexity(ref, w, progress=False, top_k=16, start=2)
    joined = extend_reference(a.reference, b.reference)
    assert torch.allclose(joined.topk_logp, whole.reference.topk_logp, atol=1e-5)
    assert a.window_nll + b.window_nll == pytest.approx(whole.window_nll, rel=1e-5)
    q1 = perplexity(other, w, progress=False, reference=whole.reference)
    q2 = perplexity(other, w, progress=False, reference=joined, start=3)
    assert q2.window_nll == pytest.approx(q1.window_nll[3:], rel=1e-5)
    assert q2.kld.window_kld == pytest.approx(q1.kld.window_kld[3:], rel=1e-4)
    # the KL statistics of stages merge into the one-pass statistics (median, p99 and max included)
    from advisor.models.evaluate import merge_kl

    q0 = perplexity(other, w, progress=False, reference=whole.reference, stop=3)
    merged, one = merge_kl([q0.kld, q2.kld]).to_dict(), q1.kld.to_dict()
    assert merged.keys() == one.keys()
    for k in one:
        assert merged[k] == pytest.approx(one[k], rel=1e-4), k
