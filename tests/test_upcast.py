"""16-bit weights with float32 products (models.upcast): same numbers as float32 arithmetic on the 16-bit
weights, no float32 copy of the model kept for the backward pass, and chosen by the loader only where the
CPU has no bf16 arithmetic."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advisor.models import loading
from advisor.models import upcast
from advisor.models.upcast import float32_products
from tests.conftest import VOCAB, tiny_model


def _float32(module: nn.Module) -> bool:
    return getattr(module.forward, "__func__", None) is upcast._forward


def _bf16_llama():
    return tiny_model("llama").to(torch.bfloat16)


@pytest.mark.parametrize("bias", [True, False])
def test_products_and_gradients_equal_float32_arithmetic_on_the_16_bit_weights(bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias).to(torch.bfloat16)
    ref = copy.deepcopy(layer).float()  # the reference: the same (bf16-valued) weights, float32 throughout
    float32_products(layer)
    x = torch.randn(3, 5, 24).to(torch.bfloat16).requires_grad_(True)
    xr = x.detach().float().requires_grad_(True)
    out, want = layer(x), ref(xr)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want.to(torch.bfloat16), rtol=0, atol=0)
    g = torch.randn(3, 5, 40)
    out.backward(g.to(torch.bfloat16))
    want.backward(g.to(torch.bfloat16).float())
    torch.testing.assert_close(x.grad, xr.grad.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad.to(torch.bfloat16), rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad.to(torch.bfloat16), rtol=0, atol=0)


def test_a_model_computes_close_to_float32_and_to_torchs_bf16_products():
    model = _bf16_llama()
    native = copy.deepcopy(model)
    wide = copy.deepcopy(model).float()
    assert float32_products(model) == sum(type(m) is nn.Linear for m in model.modules()) > 0
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
        torch.testing.assert_close(got, wide(input_ids=ids).logits, rtol=0.05, atol=0.05)
        torch.testing.assert_close(got, native(input_ids=ids).logits.float(), rtol=0.05, atol=0.05)


def test_the_backward_pass_keeps_the_16_bit_weights_not_float32_copies():
    """Autograd saves each layer's own 16-bit weight (the parameter's storage), never a float32 copy of it:
    a forward and backward pass adds activations, not a float32 model."""
    model = _bf16_llama()
    float32_products(model)
    weights = {m.weight.data_ptr(): m.weight.numel() for m in model.modules() if type(m) is nn.Linear}
    sizes = set(weights.values())
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t.data_ptr()))
        return t

    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(ptr in weights for _, _, ptr in saved)  # the parameters themselves are what is kept
    assert not [s for s in saved if s[0] == torch.float32 and s[1] in sizes and s[2] not in weights]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_probe_is_finite_on_a_bf16_model_with_float32_products():
    import advisor.probes as probes
    from advisor.models.adapters import get_adapter
    from advisor.models.data import Windows
    from advisor.models.loading import LoadedModel, ModelSource

    model = _bf16_llama()
    float32_products(model)
    loaded = LoadedModel(model, None, get_adapter(model), ModelSource("tiny-bf16", "test", "llama", "bf16-0"))
    calib = Windows(torch.randint(0, VOCAB, (3, 16)), {"test": "bf16"})
    rec = probes.run_probes(loaded, calib, settings={"rtn_loss": {"keys": ["int4_g32"]}})
    bad = {k: v for k, v in rec.features.items() if not torch.isfinite(torch.tensor(float(v)))}
    assert not bad


def test_the_loader_multiplies_in_float32_only_where_the_cpu_has_no_bf16(tiny_folder, monkeypatch):
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: False)
    loaded = loading.load(str(tiny_folder), dtype="bfloat16")
    linears = [m for m in loaded.model.modules() if type(m) is nn.Linear]
    assert "products" in loaded.info and all(_float32(m) for m in linears)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: True)
    native = loading.load(str(tiny_folder), dtype="bfloat16")
    assert "products" not in native.info
    assert not any(_float32(m) for m in native.model.modules() if type(m) is nn.Linear)
    assert "products" not in loading.load(str(tiny_folder), dtype="float32").info
    ids = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits.float(),
                                   native.model(input_ids=ids).logits.float(), rtol=0.05, atol=0.05)


def test_f_linear_is_what_plain_layers_keep():
    """A float32 layer of a wrapped model computes as before (a layer replaced later by float32 weights)."""
    layer = nn.Linear(8, 4)
    float32_products(layer)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
