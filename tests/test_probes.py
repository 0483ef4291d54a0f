"""Probes: Hutchinson vs the exact Hessian trace, Fisher/second-order vs exact on a toy, determinism,
finiteness, clear errors. Tiny random models built from configs; no downloads."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advisor import probes
from advisor.models.adapters import Adapter, Family, get_adapter
from advisor.models.data import Windows
from advisor.models.errors import AdvisorError
from advisor.models.loading import LoadedModel, ModelSource
from advisor.probes._util import double_backward_attention, grad_only, preserved_state, token_nll

PREFIXES = ("hessian.", "fisher.", "perturbation.", "outliers.", "sqnr.", "second_order.", "rtn_loss.")
# cheap settings for tests: a few dtypes, no extra corpus
FAST = {
    "hessian": {"n_probes": 4, "power_iters": 2},
    "outliers": {"extra_sets": []},
    "sqnr": {"dtypes": ["int4", "int8", "nf4", "mxfp4", "fp6_e3m2"]},
    "second_order": {"dtypes": ["int4", "int8", "nf4", "mxfp4", "fp6_e3m2"]},
    "perturbation": {"sigmas": [0.01, 0.05, 0.2]},
    "rtn_loss": {"keys": ["int4_g128", "int8_pc"]},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _micro_llama(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def _loaded(model) -> LoadedModel:
    return LoadedModel(model, None, get_adapter(model), ModelSource("tiny", "test", "tiny", "0" * 16))


def _calib(n: int = 3, seq_len: int = 16, vocab: int = 64, seed: int = 0) -> Windows:
    ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, {"dataset": "random-tokens", "seed": seed})


def _exact_hessian(model, W: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The full Hessian of the mean token NLL w.r.t. ``W``: one batched HVP per basis vector."""
    with preserved_state(model), double_backward_attention(model):
        grad_only(model, [W])
        (g,) = torch.autograd.grad(token_nll(model, ids).mean(), [W], create_graph=True)
        n = W.numel()
        (H,) = torch.autograd.grad([g], [W], grad_outputs=[torch.eye(n).view(n, *W.shape)], is_grads_batched=True)
    return H.reshape(n, n)


def test_hutchinson_trace_matches_exact_trace():
    model = _micro_llama()
    loaded = _loaded(model)
    calib = _calib(1, 12)
    name = "model.layers.0.mlp.down_proj"
    W = dict(loaded.adapter.linear_layers())[name].weight
    attn_before = model.config._attn_implementation
    H = _exact_hessian(model, W, calib.ids)
    exact = float(H.diagonal().sum())
    eig = float(torch.linalg.eigvalsh((H + H.T) / 2).abs().max())
    res = probes.get_probe("hessian").run(loaded, calib, seed=0, settings={
        "layers": [r"mlp\.down_proj$"], "n_probes": 512, "probe_batch": 512, "power_iters": 20})
    est, se = res.features["trace"], res.features["trace_se"]
    assert abs(est - exact) / abs(exact) < 0.05, (est, exact, se)
    assert abs(est - exact) < 4 * se
    assert res.per_layer["layer"].tolist() == [name]
    assert abs(abs(res.features["top_eigenvalue"]) - eig) / eig < 0.05
    # the model is left as it was
    assert model.config._attn_implementation == attn_before
    assert all(p.requires_grad for p in model.parameters())


def test_batched_hvp_equals_one_at_a_time():
    from advisor.probes.hessian import hutchinson

    model = _micro_llama()
    loaded = _loaded(model)
    ids = _calib(1, 10).ids
    params = [li.module.weight for li in probes._util.layer_infos(loaded)][:3]
    with preserved_state(model), double_backward_attention(model):
        grad_only(model, params)
        one, _, _ = hutchinson(lambda: token_nll(model, ids).mean(), params, 6, 0, seed=3, probe_batch=1)
        many, _, _ = hutchinson(lambda: token_nll(model, ids).mean(), params, 6, 0, seed=3, probe_batch=4)
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("labels", ["empirical", "sampled"])
def test_batched_fisher_equals_per_window_reference(labels):
    from advisor.probes.fisher import fisher_diagonal, fisher_diagonal_reference
    from advisor.probes._util import layer_infos

    model = _micro_llama()
    loaded = _loaded(model)
    ids = _calib(5, 12).ids
    layers = [li.module for li in layer_infos(loaded)]
    with preserved_state(model):
        grad_only(model, [m.weight for m in layers])
        ref = fisher_diagonal_reference(model, [m.weight for m in layers], ids, labels, seed=2)
        fast = fisher_diagonal(model, layers, ids, labels, seed=2, batch_size=2)
    for a, b in zip(ref[0] + ref[2], fast[0] + fast[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
    assert math.isclose(ref[1], fast[1], rel_tol=1e-5)


class _BigramLM(nn.Module):
    """logits = W one_hot(token): a softmax-regression language model (Hessian = Fisher at the MLE)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.head = nn.Linear(vocab, vocab, bias=False)
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.head(F.one_hot(input_ids, self.vocab).float()))


def test_second_order_matches_loss_increase_on_quadratic_toy():
    """At the maximum-likelihood bigram weights the gradient vanishes, the empirical Fisher diagonal is
    the Hessian diagonal, so 1/2 sum F e^2 must match the measured loss increase for small errors."""
    from advisor.probes._rtn import rtn_error
    from advisor.probes.fisher import fisher_diagonal_reference
    from advisor.probes.second_order import second_order_estimate

    V, n_win, L = 16, 64, 129
    gen = torch.Generator().manual_seed(0)
    P = torch.softmax(0.5 * torch.randn(V, V, generator=gen), -1)  # true transitions
    ids = torch.zeros(n_win, L, dtype=torch.long)
    ids[:, 0] = torch.randint(0, V, (n_win,), generator=gen)
    for t in range(1, L):
        ids[:, t] = torch.multinomial(P[ids[:, t - 1]], 1, generator=gen).squeeze(1)
    counts = torch.zeros(V, V)
    counts.index_put_((ids[:, 1:].reshape(-1), ids[:, :-1].reshape(-1)), torch.ones(n_win * (L - 1)), accumulate=True)
    assert (counts > 0).all()
    model = _BigramLM(V)
    with torch.no_grad():  # MLE: W[o, i] = log p(o | i)
        model.head.weight.copy_(torch.log(counts / counts.sum(0, keepdim=True)))
    W = model.head.weight
    (Fd,), nll0, (g_mean,) = fisher_diagonal_reference(model, [W], ids)
    assert g_mean.abs().max() < 1e-5  # at the optimum
    # Fisher diagonal vs exact Hessian diagonal
    H = torch.autograd.functional.hessian(
        lambda w: F.cross_entropy((F.one_hot(ids[:, :-1], V).float() @ w.T).reshape(-1, V), ids[:, 1:].reshape(-1)),
        W.detach())
    Hdiag = H.reshape(V * V, V * V).diagonal().view(V, V)
    assert abs(float(Fd.sum() / Hdiag.sum()) - 1) < 0.1
    for dtype, g in (("int8", None), ("fp8_e4m3", None), ("int4", None)):
        e = rtn_error(W, dtype, g)
        with torch.no_grad():
            W.add_(e)
            nll1 = float(token_nll(model, ids).mean())
            W.sub_(e)
        measured = nll1 - float(token_nll(model, ids).mean().detach())
        estimate = second_order_estimate(Fd, e)
        assert measured > 0
        assert abs(estimate / measured - 1) < 0.1, (dtype, estimate, measured)


def test_second_order_formula_on_exact_quadratic():
    from advisor.probes.second_order import second_order_estimate

    gen = torch.Generator().manual_seed(1)
    d = torch.rand(50, generator=gen) + 0.1
    e = torch.randn(50, generator=gen) * 1e-2
    loss = lambda w: 0.5 * float((d.double() * w.double() ** 2).sum())  # noqa: E731 - minimum at 0, Hessian diag(d)
    assert math.isclose(second_order_estimate(d, e), loss(e) - loss(torch.zeros(50)), rel_tol=1e-9)


def test_all_probes_finite_prefixed_and_deterministic():
    model = _micro_llama()
    loaded = _loaded(model)
    calib = _calib()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = probes.run_probes(loaded, calib, seed=0, settings=FAST)
    b = probes.run_probes(loaded, calib, seed=0, settings=FAST)
    c = probes.run_probes(loaded, calib, seed=1, settings={**FAST, "sqnr": {"dtypes": ["int4"]}}, names=["hessian"])
    assert a.features == b.features
    assert a.features["hessian.trace"] != c.features["hessian.trace"]
    for p in PREFIXES:
        assert any(k.startswith(p) for k in a.features), p
    assert all(math.isfinite(v) for v in a.features.values())
    assert not a.provenance["dropped_nonfinite"]
    for k, v in model.state_dict().items():  # probes leave the weights untouched
        assert torch.equal(v, before[k]), k
    d = a.to_dict()
    assert set(d) == {"features", "per_layer", "provenance", "seconds"}
    assert probes.FeatureRecord.from_dict(d).features == a.features
    assert set(d["per_layer"]) == {"hessian", "fisher", "perturbation", "outliers", "sqnr", "second_order", "rtn_loss"}
    # second-order estimates order the formats like their errors
    f = a.features
    assert f["second_order.int8_pc"] < f["second_order.fp6_e3m2_pc"] < f["second_order.int4_g128"]
    assert f["sqnr.int8_pc_db"] > f["sqnr.int4_g128_db"] > 10


def test_probes_on_every_architecture():
    from tests.conftest import ARCHS, VOCAB, tiny_model

    for arch in ("opt", "gpt2", "gpt_neox"):
        assert arch in ARCHS
        loaded = _loaded(tiny_model(arch))
        rec = probes.run_probes(loaded, _calib(2, 12, VOCAB), settings={**FAST, "second_order": {"dtypes": ["int4"]}},
                                names=["hessian", "fisher", "outliers", "second_order"])
        assert all(math.isfinite(v) for v in rec.features.values()), arch
        assert set(rec.per_layer["fisher"]["kind"]) == {"attn", "mlp"}


def test_bad_input_gives_clear_errors():
    model = _micro_llama()
    loaded = _loaded(model)
    empty = Windows(torch.zeros(0, 16, dtype=torch.long), {})
    with pytest.raises(AdvisorError, match="calibration set is empty"):
        probes.run_probes(loaded, empty)
    with pytest.raises(AdvisorError, match="calibration set is empty"):
        probes.get_probe("fisher").run(loaded, empty)
    no_linear = LoadedModel(model, None, Adapter(model, Family("none", ("llama",), "model.layers", ())),
                            ModelSource("x", "test", "x", "0"))
    with pytest.raises(AdvisorError, match="no linear layers"):
        probes.run_probes(no_linear, _calib())
    with pytest.raises(AdvisorError, match="unknown probe"):
        probes.run_probes(loaded, _calib(), names=["hesian"])
    with pytest.raises(AdvisorError, match="unknown setting"):
        probes.run_probes(loaded, _calib(), names=["fisher"], settings={"fisher": {"n_window": 2}})


def test_feature_key_of_specs():
    assert probes.feature_key("rtn:int4:g128") == "int4_g128"
    assert probes.feature_key("gptq:int8") == "int8_pc"
    assert probes.feature_key("rtn:mxfp4") == "mxfp4"
    assert probes.default_group("int4") == 128 and probes.default_group("mxfp4") is None
    assert all(p.description for p in probes.PROBES.values())


def test_rtn_weight_equals_the_quantizer_reference():
    """The probes' RTN weights (group views, grid values) equal the quantizers' codes-then-dequantize path
    bit for bit, for every format of the sqnr grid, whole and partial groups, zero rows and bf16 input."""
    from advisor.probes._rtn import configs, rtn_weight, rtn_weight_reference

    g = torch.Generator().manual_seed(0)
    for shape in ((16, 256), (9, 200), (4, 96), (6, 576)):
        W = torch.randn(shape, generator=g) * 0.05
        W[0, :5], W[1] = 0.0, 0.0
        W[2, 3] = 40.0  # one outlier: a group whose scale is set by it
        for w in (W, W.to(torch.bfloat16)):
            for dtype, group, key in configs(None, all_group_sizes=True):
                assert torch.equal(rtn_weight(w, dtype, group), rtn_weight_reference(w, dtype, group)), (shape, key)


def test_stacked_rtn_errors_equal_layer_by_layer():
    from advisor.probes._rtn import layer_rows, rtn_error, sampled_rtn_errors
    from advisor.probes._util import layer_infos

    layers = layer_infos(_loaded(_micro_llama()))
    rows = layer_rows(layers, max_elements=300, min_rows=2, seed=0)
    assert all(2 <= r.numel() < li.module.out_features for r, li in zip(rows, layers))
    for dtype, g in (("int4", 8), ("nf4", None), ("mxfp4", None)):
        stacked = sampled_rtn_errors(layers, rows, dtype, g)
        for li, r, e in zip(layers, rows, stacked):
            torch.testing.assert_close(e, rtn_error(li.module.weight.detach()[r], dtype, g), rtol=0, atol=0)


def test_rtn_loss_equals_the_quantize_then_evaluate_reference():
    """The probe's in-place RTN pass gives the loss increase of the real pipeline (quantize_model, then the
    mean NLL) on the same windows, and leaves the weights bitwise untouched."""
    from advisor.models.pipeline import quantize_model
    from advisor.probes._util import mean_nll

    model = _micro_llama()
    loaded = _loaded(model)
    calib = _calib(4, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = probes.run_probes(loaded, calib, names=["rtn_loss"],
                            settings={"rtn_loss": {"keys": ["int4_g128", "int3_pc", "mxfp4", "int8_pc", "int4_g24_asym"]}})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    base = mean_nll(model, calib.ids)
    for key, spec in (("int4_g128", "rtn:int4:g128"), ("int3_pc", "rtn:int3"), ("mxfp4", "rtn:mxfp4"),
                      ("int4_g24_asym", "rtn:int4:g24:asym")):  # any group size, asymmetric as asked
        quantize_model(loaded, spec, None, pack=False, progress=False)
        want = mean_nll(model, calib.ids) - base
        model.load_state_dict(before)
        assert rec.features[f"rtn_loss.{key}"] == pytest.approx(want, rel=1e-4, abs=1e-6), key
        assert rec.features[f"rtn_loss.{key}_se"] > 0
    f = rec.features
    assert abs(f["rtn_loss.int8_pc"]) < abs(f["rtn_loss.int3_pc"])  # a random model: signs are random
    frame = rec.per_layer["rtn_loss"]
    assert list(frame["key"]) == ["int4_g128", "int3_pc", "mxfp4", "int8_pc", "int4_g24_asym"]
    with pytest.raises(AdvisorError, match="unknown format key"):
        probes.run_probes(loaded, calib, names=["rtn_loss"], settings={"rtn_loss": {"keys": ["int5_g100"]}})


def test_rtn_loss_formats_are_the_candidate_grids():
    """The predictor reads rtn_loss at each candidate's format: the probed keys must cover the grid."""
    from advisor.candidates import DEFAULT_SPECS
    from advisor.features import RTN_LOSS_KEYS

    assert list(RTN_LOSS_KEYS) == list(dict.fromkeys(probes.feature_key(s) for s in DEFAULT_SPECS))


# --- scaling: chunked head, folded Fisher, swapped weights, early stop --------------------------------
from tests.conftest import ALL_ARCHS  # noqa: E402


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_chunked_nll_equals_full_logits(arch, monkeypatch):
    """The head applied to chunks of tokens gives the full-logits NLL and its gradient, on every
    architecture (through the generic cut, or the full-logits fallback where the cut does not hold)."""
    from advisor.models.adapters import get_adapter
    from tests.conftest import ARCHS, VOCAB, tiny_model
    from advisor.probes import _util

    model = tiny_model(arch)
    get_adapter(model)
    ids = _calib(3, 20, min(VOCAB, 90)).ids
    monkeypatch.setattr(_util, "LOGIT_CHUNK_BYTES", 4 * VOCAB * 16)  # 16-token chunks: several per window
    split = _util.split_head(model, ids)
    assert split is not None or arch not in ARCHS
    torch.testing.assert_close(_util.chunked_window_nll(model, ids), token_nll(model, ids).detach(),
                               rtol=1e-5, atol=1e-6)
    if split is None:
        return
    h = split.hidden(ids)[:, :-1].reshape(-1, split.head.weight.shape[1]).detach().requires_grad_(True)
    w = torch.rand(h.shape[0])
    grad, nll = _util.chunked_nll_backward(split, h, ids[:, 1:].reshape(-1), w)
    full = F.cross_entropy(split.logits(h).float(), ids[:, 1:].reshape(-1), reduction="none")
    (want,) = torch.autograd.grad((full * w).sum(), h)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(nll, full.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("plain", [True, False])
def test_vocabulary_slices_and_token_chunks_give_the_full_cross_entropy(plain, monkeypatch):
    """A plain linear head (with bias, scale and cap) runs on vocabulary slices with an online log-sum-exp;
    any other head on chunks of tokens: both equal the cross-entropy of the full logits."""
    from advisor.probes import _util

    class Wrapped(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    vocab, d, n = 1000, 24, 70
    head = (nn.Linear if plain else Wrapped)(d, vocab, bias=True)
    split = _util.HeadSplit(body=nn.Identity(), head=head, softcap=30.0, scale=2.0)
    assert (split.linear is head) == plain
    monkeypatch.setattr(_util, "LOGIT_CHUNK_BYTES", 4 * n * 90)  # 90-row slices / 16-token chunks: many of each
    h, targets = torch.randn(n, d) * 3, torch.randint(0, vocab, (n,))
    targets[:3] = torch.tensor([0, vocab - 1, 89])  # first and last rows, a slice edge
    want = F.cross_entropy(split.logits(h).float(), targets, reduction="none")
    torch.testing.assert_close(_util.chunked_nll_from_hidden(split, h, targets), want.detach(), rtol=1e-5, atol=1e-5)


def test_softcapped_head_is_cut_with_its_cap():
    """Gemma 2 caps its logits (tanh) after the head: the cut applies the same cap."""
    import transformers as tf
    from advisor.probes import _util

    torch.manual_seed(0)
    cfg = tf.Gemma2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, vocab_size=64, max_position_embeddings=64,
                          final_logit_softcapping=0.5)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    ids = _calib(2, 12).ids
    assert _util.split_head(model, ids).softcap == 0.5
    torch.testing.assert_close(_util.chunked_window_nll(model, ids), token_nll(model, ids).detach(),
                               rtol=1e-5, atol=1e-6)


def test_a_head_that_does_more_falls_back_to_full_logits():
    """A model whose logits are not head(last hidden state) is detected and measured through full logits."""
    from advisor.probes import _util

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.base_model = inner.base_model

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids=None, use_cache=False):
            out = self.inner(input_ids=input_ids, use_cache=use_cache)
            return SimpleNamespace(logits=out.logits * 3.0)

    model = Scaled(_micro_llama())
    ids = _calib(2, 12).ids
    assert _util.split_head(model, ids) is None
    torch.testing.assert_close(_util.chunked_window_nll(model, ids), token_nll(model, ids).detach())


def test_folded_fisher_keeps_the_statistics_of_the_full_diagonal():
    """The probe folds each layer's diagonal into its statistics and second_order's rows as it is produced:
    the same per-layer trace, max and mean-gradient norm, and the same rows, as the full diagonal; and
    second_order from those rows equals the estimate from the full diagonal."""
    from advisor.probes._rtn import layer_rows, sampled_rtn_errors
    from advisor.probes._util import layer_infos
    from advisor.probes.fisher import fisher_diagonal
    from advisor.probes.second_order import second_order_estimate

    model = _micro_llama()
    loaded = _loaded(model)
    calib = _calib(4, 16)
    layers = layer_infos(loaded)
    settings = {"second_order": {"keys": ["int4_g128", "int8_pc"], "max_elements": 300}}
    rec = probes.run_probes(loaded, calib, names=["fisher", "second_order"], settings=settings)
    with preserved_state(model), torch.enable_grad():
        grad_only(model, [li.module.weight for li in layers])
        full, nll, mean = fisher_diagonal(model, [li.module for li in layers], calib.ids)
    frame = rec.per_layer["fisher"]
    torch.testing.assert_close(torch.tensor(frame["trace"].tolist()), torch.tensor([float(f.double().sum()) for f in full]))
    torch.testing.assert_close(torch.tensor(frame["max"].tolist()), torch.tensor([float(f.max()) for f in full]))
    torch.testing.assert_close(torch.tensor(frame["mean_grad_sq_norm"].tolist()),
                               torch.tensor([float(m.double().pow(2).sum()) for m in mean]))
    assert rec.features["fisher.loss"] == pytest.approx(nll, rel=1e-6)
    rows = layer_rows(layers, 300, 1, 0)
    for key, (dtype, g) in {"int4_g128": ("int4", 128), "int8_pc": ("int8", None)}.items():
        errors = sampled_rtn_errors(layers, rows, dtype, g)
        want = sum(li.module.out_features / r.numel() * second_order_estimate(f[r], e)
                   for li, r, f, e in zip(layers, rows, full, errors))
        assert rec.features[f"second_order.{key}"] == pytest.approx(want, rel=1e-5)


def test_fisher_over_several_passes_equals_one_pass():
    """With fewer windows per pass than windows the diagonal accumulates over passes: same features."""
    loaded = _loaded(_micro_llama())
    calib = _calib(4, 16)
    one = probes.run_probes(loaded, calib, names=["fisher"])
    many = probes.run_probes(loaded, calib, names=["fisher"], settings={"fisher": {"batch_size": 3}})
    for k, v in one.features.items():
        assert many.features[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k


def test_rtn_loss_stops_when_precise_enough_and_records_the_precision():
    from advisor.probes._util import mean_nll

    model = _micro_llama()
    loaded = _loaded(model)
    calib = _calib(8, 16)
    keys = ["int2_g64", "int8_pc"]
    fixed = probes.run_probes(loaded, calib, names=["rtn_loss"], settings={"rtn_loss": {"keys": keys}})
    early = probes.run_probes(loaded, calib, names=["rtn_loss"],
                              settings={"rtn_loss": {"keys": keys, "target_rel_se": 100.0, "min_windows": 2}})
    floor = probes.run_probes(loaded, calib, names=["rtn_loss"],
                              settings={"rtn_loss": {"keys": keys, "target_rel_se": 1e-9, "target_abs_se": 1e9}})
    never = probes.run_probes(loaded, calib, names=["rtn_loss"],
                              settings={"rtn_loss": {"keys": keys, "target_rel_se": 1e-9}})
    two = probes.run_probes(loaded, calib, names=["rtn_loss"], settings={"rtn_loss": {"keys": keys, "n_windows": 2}})
    assert list(fixed.per_layer["rtn_loss"]["n_windows"]) == [8, 8]
    assert list(early.per_layer["rtn_loss"]["n_windows"]) == [2, 2]
    assert list(floor.per_layer["rtn_loss"]["n_windows"]) == [2, 2]
    assert list(never.per_layer["rtn_loss"]["n_windows"]) == [2, 2]  # out of reach: more windows would not do
    assert list(never.per_layer["rtn_loss"]["rtn_passes"]) == [1, 1]
    for k in keys:  # the same windows give the same numbers whatever the schedule
        assert early.features[f"rtn_loss.{k}"] == pytest.approx(two.features[f"rtn_loss.{k}"], rel=1e-6, abs=1e-9)
        assert early.provenance["probes"]["rtn_loss"]["precision"][k]["n_windows"] == 2
    # the two-window figure is the paired difference on those two windows
    base = mean_nll(model, calib.ids[:2])
    from advisor.models.pipeline import quantize_model

    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_model(loaded, "rtn:int2:g64", None, pack=False, progress=False)
    want = mean_nll(model, calib.ids[:2]) - base
    model.load_state_dict(before)
    assert early.features["rtn_loss.int2_g64"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_swapped_weights_restore_even_after_an_error():
    from advisor.probes._util import layer_infos, swapped_weights

    model = _micro_llama()
    layers = layer_infos(_loaded(model))
    before = [li.module.weight.data for li in layers]
    with pytest.raises(RuntimeError, match="boom"):
        with swapped_weights(layers, lambda W, name: W * 0):
            def fail(mod, args, out):
                raise RuntimeError("boom")
            h = layers[0].module.register_forward_hook(fail)
            try:
                model(input_ids=_calib(1, 8).ids)
            finally:
                h.remove()
    assert all(li.module.weight.data.data_ptr() == b.data_ptr() for li, b in zip(layers, before))
    assert not any(li.module._forward_pre_hooks for li in layers)


def test_rtn_loss_takes_the_windows_its_standard_error_asks_for():
    """After the first round a format gets the windows the target needs (n * (se/target)^2), at most
    ``min_windows`` more per round, until its standard error meets the target or the windows run out; values then equal
    a fixed run on that many windows."""
    import math

    from advisor.probes import rtn_loss

    loaded = _loaded(_micro_llama())
    calib = _calib(16, 16)
    first = probes.run_probes(loaded, calib, names=["rtn_loss"], settings={"rtn_loss": {"keys": ["int3_pc"], "n_windows": 2}})
    dnll, se = first.features["rtn_loss.int3_pc"], first.features["rtn_loss.int3_pc_se"]
    target = se / abs(dnll) / math.sqrt(3.5)  # asks for 2 * 3.5 = 7 windows: more than one doubling
    rec = probes.run_probes(loaded, calib, names=["rtn_loss"],
                            settings={"rtn_loss": {"keys": ["int3_pc"], "target_rel_se": target}})
    row = rec.per_layer["rtn_loss"].iloc[0]
    assert row["n_windows"] >= 4 and row["rtn_passes"] >= 2
    assert row["n_windows"] <= 2 * row["rtn_passes"]  # 2, then at most 2 more per round
    # it stopped for a reason: target met, windows run out, or a target out of reach
    need = row["n_windows"] * (row["rel_se"] / target) ** 2
    assert row["rel_se"] <= target or row["n_windows"] == 16 or need > rtn_loss.OUT_OF_REACH * 16
    fixed = probes.run_probes(loaded, calib, names=["rtn_loss"],
                              settings={"rtn_loss": {"keys": ["int3_pc"], "n_windows": int(row["n_windows"])}})
    assert rec.features["rtn_loss.int3_pc"] == pytest.approx(fixed.features["rtn_loss.int3_pc"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_rtn_loss_on_moe_equals_the_quantize_then_evaluate_reference(arch):
    """Experts are views into fused tensors: rtn_loss still measures the whole quantized model and leaves
    every weight as it was."""
    from advisor.models.pipeline import quantize_model
    from advisor.probes._util import mean_nll
    from tests.conftest import VOCAB, tiny_model

    model = tiny_model(arch)
    loaded = _loaded(model)
    calib = _calib(3, 16, VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = probes.run_probes(loaded, calib, names=["rtn_loss"], settings={"rtn_loss": {"keys": ["int3_pc"]}})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    base = mean_nll(model, calib.ids)
    quantize_model(loaded, "rtn:int3", None, pack=False, progress=False)
    want = mean_nll(model, calib.ids) - base
    model.load_state_dict(before)
    assert rec.features["rtn_loss.int3_pc"] == pytest.approx(want, rel=1e-4, abs=1e-6)
