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
