from __future__ import annotations

import pytest
import torch
from torch import nn

from advisor.models.adapters import get_adapter
from advisor.models.errors import AdvisorError
from tests.conftest import ARCHS, tiny_model

EXPECTED_FIRST = {"llama": "self_attn.q_proj", "mistral": "self_attn.q_proj", "qwen2": "self_attn.q_proj",
                  "gemma": "self_attn.q_proj", "opt": "self_attn.q_proj", "gpt2": "attn.c_attn",
                  "gpt_neox": "attention.query_key_value"}
EXPECTED_LAST = {"llama": "mlp.down_proj", "mistral": "mlp.down_proj", "qwen2": "mlp.down_proj",
                 "gemma": "mlp.down_proj", "opt": "fc2", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_lists_blocks_and_ordered_linears(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    assert len(blocks) == 2
    groups = adapter.linear_groups(blocks[0])
    assert len(groups) == 4  # attention inputs, attention output, MLP input(s), MLP output
    names = [n for g in groups for n, _ in g]
    assert names[0] == EXPECTED_FIRST[arch] and names[-1] == EXPECTED_LAST[arch]
    for group in groups:
        # layers in a group read the same input: same in_features
        assert len({layer.in_features for _, layer in group}) == 1
        assert all(isinstance(layer, nn.Linear) for _, layer in group)
    layers = adapter.linear_layers()
    assert len(layers) == 2 * len(names)
    assert layers[0][0].startswith(adapter.blocks_prefix() + ".0.")
    # every listed layer is a real submodule of the model under that name
    modules = dict(model.named_modules())
    assert all(modules[name] is layer for name, layer in layers)
    assert adapter.max_context == 128


@pytest.mark.parametrize("arch", ARCHS)
def test_block_order_follows_dataflow(arch):
    """Inputs of each group become available in list order: record the forward call order."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    order = []
    block = adapter.blocks()[0]
    hooks = [layer.register_forward_hook(lambda m, i, o, n=name: order.append(n))
             for g in adapter.linear_groups(block) for name, layer in g]
    with torch.no_grad():
        model(torch.randint(0, 90, (1, 8)))
    for h in hooks:
        h.remove()
    listed = [n for g in adapter.linear_groups(block) for n, _ in g]
    # group order equals first-use order (inside a group order is free)
    group_of = {n: gi for gi, g in enumerate(adapter.linear_groups(block)) for n, _ in g}
    assert [group_of[n] for n in order] == sorted(group_of[n] for n in order)
    assert set(order) == set(listed)


def test_gpt2_conv1d_replaced_without_changing_outputs():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        get_adapter(model)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_unsupported_architecture_is_named():
    class Dummy(nn.Module):
        class config:  # noqa: N801
            model_type = "mamba"

    with pytest.raises(AdvisorError, match="unsupported architecture 'mamba'.*llama"):
        get_adapter(Dummy())
