"""The block-sequential driver on real (tiny) transformers models."""
from __future__ import annotations

import pytest
import torch

from advisor.models.adapters import get_adapter
from advisor.models.data import Windows
from advisor.models.loading import LoadedModel, ModelSource
from advisor.models.pipeline import quantize_model
from advisor.quantizers import LayerStats, QuantSpec, get_method
from tests.conftest import ALL_ARCHS, ARCHS, tiny_model


def _loaded(arch, seed=0):
    model = tiny_model(arch, seed)
    return LoadedModel(model, None, get_adapter(model), ModelSource("tiny", "folder", arch, "fp"))


def _calib(n=3, seq=16):
    return Windows(torch.randint(0, 90, (n, seq), generator=torch.Generator().manual_seed(0)), {"seq_len": seq})


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_pipeline_equals_layerwise_rtn(arch):
    ref, run = _loaded(arch), _loaded(arch)
    spec = QuantSpec.parse("rtn:int4:g16")
    expected = {name: get_method("rtn").quantize(layer.weight.data, spec, LayerStats()).dequantize()
                for name, layer in ref.adapter.linear_layers()}
    result = quantize_model(run, spec, None, pack=False, progress=False)
    assert result.n_layers == len(expected)
    for name, layer in run.adapter.linear_layers():
        assert torch.equal(layer.weight.data, expected[name]), name
    assert result.bits_per_weight == pytest.approx(spec.bits_per_weight(32))


def test_first_group_statistics_equal_hand_computed_hessian():
    """H of block 0's q/k/v input is sum x x^T of the normalized embeddings, token by token."""
    loaded = _loaded("llama")
    model, block0 = loaded.model, loaded.adapter.blocks()[0]
    calib = _calib()
    seen = []
    h = block0.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for ids in calib.ids:
            model(ids[None])
    h.remove()
    X = torch.cat(seen)  # (n_windows * seq_len, hidden): block 0's q_proj input, one entry per window
    H_expected = X.T @ X

    captured = {}
    method = get_method("gptq")
    original = method.fn

    def spy(W, spec, stats):
        captured.setdefault("H", stats.H.clone())
        captured.setdefault("n", stats.n_tokens)
        return original(W, spec, stats)

    object.__setattr__(method, "fn", spy)
    try:
        quantize_model(loaded, "gptq:int4:g16", calib, pack=False, progress=False)
    finally:
        object.__setattr__(method, "fn", original)
    assert captured["n"] == calib.ids.numel()
    torch.testing.assert_close(captured["H"], H_expected, rtol=1e-4, atol=1e-4)


def test_layer_errors_reported_for_hessian_methods_only():
    rtn = quantize_model(_loaded("llama"), "rtn:int3:g16", _calib(), pack=False, progress=False)
    gptq = quantize_model(_loaded("llama"), "gptq:int3:g16", _calib(), pack=False, progress=False)
    errs = [r.rel_error for r in gptq.layers]
    assert all(e is not None and 0 < e < 1 for e in errs)
    assert rtn.layers[0].rel_error is None  # RTN collects no statistics


def test_method_needing_calibration_refuses_none():
    from advisor.models.errors import AdvisorError

    with pytest.raises(AdvisorError, match="needs calibration data"):
        quantize_model(_loaded("llama"), "gptq:int4:g16", None, pack=False, progress=False)


def test_nan_weight_is_reported_with_layer_name():
    loaded = _loaded("llama")
    loaded.adapter.blocks()[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj"):
        quantize_model(loaded, "rtn:int4:g16", None, pack=False, progress=False)


# Packed kernels vs fake quantization: the deployed model (QuantLinear, packed codes, numba/torch
# kernels) must measure the same perplexity as the dequantized weights written into nn.Linear, which
# is what sweeps measure. One spec per kernel family: int (asym groups), fp6 4+2 split, fp8, codebook
# (nf4), MX, per-row codebooks (nonuniform), outliers (quantease-outlier).
PACKED_SPECS = ["gptq:int4:g16", "rtn:int3:g16", "rtn:fp6_e3m2", "rtn:fp8_e4m3", "rtn:nf4:g16", "rtn:mxfp4",
                "rtn:mxint8", "nonuniform:int3", "quantease-outlier:int3:g16", "rtn:int8"]


@pytest.mark.parametrize("spec", PACKED_SPECS)
def test_packed_model_perplexity_equals_fake_quant(spec):
    from advisor.models.evaluate import perplexity

    windows = Windows(torch.randint(0, 90, (3, 32), generator=torch.Generator().manual_seed(1)), {"seq_len": 32})
    fake, packed = _loaded("llama"), _loaded("llama")
    quantize_model(fake, spec, _calib(), pack=False, progress=False)
    result = quantize_model(packed, spec, _calib(), pack=True, progress=False)
    from advisor.kernels import QuantLinear

    n_packed = sum(isinstance(m, QuantLinear) for m in packed.model.modules())
    assert n_packed == result.n_layers > 0
    a = perplexity(fake.model, windows)
    b = perplexity(packed.model, windows)
    # the windows are prefill batches, which QuantLinear runs as bf16 GEMMs (docs/kernels.md):
    # within 1e-3 nats (0.1% perplexity) of the fp32 fake-quant model; decode batches are fp32
    assert b.nll == pytest.approx(a.nll, rel=0, abs=1e-3), (a.nll, b.nll)
    base = perplexity(_loaded("llama").model, windows)
    assert a.nll != base.nll  # the quantization did something measurable


@pytest.mark.parametrize("spec", ["gptq:int3:g16", "awq:int4:g16", "quantease:int3:g16", "quantease-outlier:int3:g16",
                                  "nonuniform:int3"])
def test_same_inputs_give_identical_quantized_weights(spec):
    """Determinism (issue 9): every solver is a pure function of weights, calibration and seed, with 1 or 2
    threads. (Across machines or library builds it need not be: docs/predictor.md measures that spread.)"""
    a, b, fresh = _loaded("llama"), _loaded("llama"), _loaded("llama")
    threads = torch.get_num_threads()
    try:
        for run, n in ((a, 1), (b, 2)):
            torch.set_num_threads(n)
            quantize_model(run, spec, _calib(), pack=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    for (name, la), (_, lb), (_, lf) in zip(a.adapter.linear_layers(), b.adapter.linear_layers(),
                                            fresh.adapter.linear_layers()):
        assert torch.equal(la.weight, lb.weight), name
        assert not torch.equal(la.weight, lf.weight), name  # every layer was quantized


# -- every tested architecture -------------------------------------------------------------------
PROBE_FAST = {
    "hessian": {"n_probes": 2, "power_iters": 1},
    "outliers": {"extra_sets": []},
    "sqnr": {"dtypes": ["int4", "int8"]},
    "second_order": {"dtypes": ["int4"]},
    "perturbation": {"sigmas": [0.02, 0.1]},
    "rtn_loss": {"keys": ["int8_pc"], "n_windows": 1},
}


# packed GPTQ runs its statistics passes through the packed kernels (slow on tiny shapes): four
# architectures of distinct layouts by default, all of them in the slow run
GPTQ_FAST = {"llama", "falcon", "gpt2", "mixtral"}
CASES = [(a, "rtn:int4:g16") for a in ALL_ARCHS] + [
    pytest.param(a, "gptq:int4:g16", marks=() if a in GPTQ_FAST else pytest.mark.slow) for a in ALL_ARCHS]


@pytest.mark.parametrize("arch,spec", CASES)
def test_packed_perplexity_equals_fake_quant_perplexity(arch, spec, one_thread):
    """On every architecture the packed model (real kernels) measures the perplexity of the fake-quantized one."""
    import math

    from advisor.models.evaluate import perplexity

    calib = _calib(2, 16)
    ev = Windows(torch.randint(0, 90, (1, 16), generator=torch.Generator().manual_seed(5)), {"seq_len": 16})
    fake, packed = _loaded(arch), _loaded(arch)
    rf = quantize_model(fake, spec, calib, pack=False, progress=False)
    rp = quantize_model(packed, spec, calib, pack=True, progress=False)
    assert rf.n_layers == rp.n_layers == len(fake.adapter.linear_layers())
    pf = perplexity(fake.model, ev, progress=False).ppl
    pp = perplexity(packed.model, ev, progress=False).ppl
    # prefill batches run as bf16 GEMMs (docs/kernels.md): within 1e-3 nats of fake quant
    assert math.isfinite(pf) and math.log(pp) == pytest.approx(math.log(pf), abs=1e-3), (arch, spec)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_probe_is_finite_on_every_architecture(arch, one_thread):
    import math

    from advisor import probes

    record = probes.run_probes(_loaded(arch), _calib(2, 16), seed=0, settings=PROBE_FAST)
    assert record.features and all(math.isfinite(v) for v in record.features.values()), arch


def test_experts_no_calibration_token_reached_are_rounded_and_reported():
    """GPTQ needs statistics; an expert the router never chose during calibration gets none: it is
    rounded to nearest and its report says so, instead of failing or zeroing the expert."""
    loaded = _loaded("mixtral")
    one_token = Windows(torch.tensor([[3, 4]]), {"seq_len": 2})
    result = quantize_model(loaded, "gptq:int4:g16", one_token, pack=False, progress=False)
    unreached = [r for r in result.layers if "unreached" in r.info]
    assert unreached and len(unreached) < len(result.layers)
    assert all(".experts." in r.name for r in unreached)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_packing_leaves_the_callers_layer_objects_as_they_were(arch):
    """recommend keeps the layer objects and puts them back after an attempt: a calibrated method's
    statistics passes must not write its quantized weights into them (the next attempt, and the
    baseline's extra windows, would start from a quantized model)."""
    loaded = _loaded(arch)
    layers = dict(loaded.adapter.linear_layers())
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    quantize_model(loaded, "gptq:int3:g16", _calib(), pack=True, progress=False)
    changed = [name for name, layer in layers.items() if not torch.equal(layer.weight, before[name])]
    assert not changed, changed
