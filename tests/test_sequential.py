"""recommend's sequential test on a real tiny model: it stops early both ways, and measures further windows
of the same text while the bound straddles the budget."""
from __future__ import annotations

import json
import math

import pytest

from advisor.api import Budget, _execute, _restore, predict_candidates, prepare
from advisor.sequential import INCONCLUSIVE, MISS, PASS, SequentialRule, plan_looks
from advisor.store import Store
from tests.conftest import PTB
from tests.test_predictor import synthetic_runs

pytestmark = pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")

K = 16  # protocol windows: looks at 4, 8, 12, 16, then 24 and 32 on further windows of the text
SPEC = "rtn:int3:g32"


def test_looks_and_critical_value():
    assert plan_looks(16, 40) == (4, 8, 12, 16, 24, 32)
    assert plan_looks(16, 20) == (4, 8, 12, 16, 20)  # the text runs out: the last look is what it has
    assert plan_looks(16, 40, early_stop=False) == (16, 24, 32)
    assert plan_looks(4, 4) == (4,)
    rule = SequentialRule((4, 8, 12, 16, 24, 32), 0.9)
    assert rule.z == pytest.approx(2.128, abs=1e-3)  # Phi^-1(1 - 0.1 / 6): Bonferroni over the looks
    # the rule itself: pass below, miss above, continue while straddling, inconclusive at the last look
    d = [0.10, 0.12, 0.08, 0.11]
    assert rule.decide(d, 1.0)[0] == PASS and rule.decide(d, 0.0)[0] == MISS
    assert rule.decide(d, 0.1025)[0] == "continue" and rule.decide(d, 0.1025, final=True)[0] == INCONCLUSIVE
    verdict, mean, se = rule.decide(d, 1.0)
    assert mean == pytest.approx(0.1025) and se == pytest.approx(0.0085391, rel=1e-4)


@pytest.fixture(scope="module")
def ctx(tiny_folder, tmp_path_factory, one_thread):
    store = Store(tmp_path_factory.mktemp("seq") / "m.sqlite")
    return prepare(str(tiny_folder), calib=f"file:{PTB}", eval=f"file:{PTB}", seq_len=32, max_windows=K, n_calib=2,
                   store=store, progress=False, specs=[SPEC])


@pytest.fixture(scope="module")
def row(ctx):
    from advisor.predictor import Predictor

    df = synthetic_runs(n_models=9)
    pred = Predictor().fit(df).calibrate(df, df["family"].to_numpy())
    return predict_candidates(ctx, [SPEC], 0.9, pred).iloc[0]


def attempt(ctx, row, max_dl, early_stop=True, metric="dl"):
    a, quantized = _execute(ctx, row, Budget(max_dl, f"test budget {max_dl}", metric), False, confidence=0.9,
                            early_stop=early_stop)
    _restore(ctx, quantized)
    return a


@pytest.fixture(scope="module")
def full(ctx, row):
    """Every protocol window, no early stop, a budget it passes: the reference measurement."""
    a = attempt(ctx, row, 1e9, early_stop=False)
    assert a.verdict == PASS and a.n_windows == K and a.measured_dl > 0 and a.dl_se > 0
    return a


def test_passes_early(ctx, row, full):
    a = attempt(ctx, row, full.measured_dl + 20 * full.dl_se)
    assert a.verdict == PASS and a.passed and a.n_windows < K
    assert [x["verdict"] for x in a.looks][-1] == PASS and a.looks[-1]["upper"] <= full.measured_dl + 20 * full.dl_se
    assert a.kld["n_tokens"] == a.n_windows * 31  # the KL statistics cover exactly the windows measured


def test_misses_early(ctx, row, full):
    a = attempt(ctx, row, full.measured_dl - 20 * full.dl_se)
    assert a.verdict == MISS and not a.passed and a.n_windows < K
    assert a.looks[-1]["lower"] > full.measured_dl - 20 * full.dl_se


def test_straddling_bound_measures_more_windows(ctx, row, full):
    """A budget at the protocol's own estimate: the bound straddles it at every window of the protocol, so
    the test goes on to further windows of the text, and never calls it verified unless a bound clears."""
    a = attempt(ctx, row, full.measured_dl)
    by_n = {x["n_windows"]: x for x in a.looks}
    assert by_n[K]["verdict"] == "continue" and by_n[K]["estimate"] == pytest.approx(full.measured_dl, abs=1e-6)
    # on this model and text the bound still straddles after twice the protocol's windows: inconclusive,
    # which is never verified
    assert len(ctx.extension) == K and [x["n_windows"] for x in a.looks] == [4, 8, 12, 16, 24, 32]
    assert a.verdict == INCONCLUSIVE and not a.passed and a.n_windows == 2 * K
    assert all(x["verdict"] == "continue" for x in a.looks[:-1]) and a.looks[-1]["verdict"] == INCONCLUSIVE
    assert a.looks[-1]["lower"] <= full.measured_dl <= a.looks[-1]["upper"]
    assert a.kld["n_tokens"] == 2 * K * 31
    # the store holds the run under the windows it measured: the protocol's, then the further ones
    runs = ctx.store.runs()
    windows = [json.loads(p)["n_windows"] for p in runs.loc[runs["spec"] == SPEC, "protocol"]]
    assert K in windows and 2 * K in windows
    # the staged measurement over the first K windows is the one-pass one
    assert by_n[K]["se"] == pytest.approx(full.dl_se, rel=1e-4)


def test_kl_budget_is_measured(ctx, row, full):
    a = attempt(ctx, row, full.kld["mean"] * 100, metric="kld")
    assert a.verdict == PASS and a.n_windows < K and a.looks[-1]["estimate"] == pytest.approx(
        sum_kl(ctx, row, a.n_windows), rel=1e-4)
    m = attempt(ctx, row, full.kld["mean"] / 100, metric="kld")
    assert m.verdict == MISS and m.n_windows < K


def sum_kl(ctx, row, n):
    """Mean KL over the first ``n`` windows, measured in one pass (the staged looks' reference)."""
    from advisor.models.evaluate import perplexity
    from advisor.models.pipeline import quantize_model

    originals = dict(ctx.loaded.adapter.linear_layers())
    result = quantize_model(ctx.loaded, row["spec"], ctx.calib, pack=True, progress=False)
    r = perplexity(ctx.loaded.model, ctx.eval, reference=ctx.reference, stop=n, progress=False)
    _restore(ctx, (originals, result))
    assert math.isfinite(r.kld.mean)
    return r.kld.mean
