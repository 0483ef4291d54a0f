"""Architecture discovery on tiny random models of every tested transformers architecture."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from advisor.models.adapters import HINTS, SlicedExperts, discover, get_adapter
from advisor.models.errors import AdvisorError
from tests.conftest import ALL_ARCHS, ARCHS, tiny_config, tiny_model

EXPECTED_FIRST = {"llama": "self_attn.q_proj", "mistral": "self_attn.q_proj", "qwen2": "self_attn.q_proj",
                  "gemma": "self_attn.q_proj", "opt": "self_attn.q_proj", "gpt2": "attn.c_attn",
                  "gpt_neox": "attention.query_key_value"}
EXPECTED_LAST = {"llama": "mlp.down_proj", "mistral": "mlp.down_proj", "qwen2": "mlp.down_proj",
                 "gemma": "mlp.down_proj", "opt": "fc2", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}
# blocks whose attention and MLP read the same normalised input (one group holds q/k/v and the MLP input)
PARALLEL = {"falcon", "gptj", "cohere"}
MOE = {"mixtral", "qwen3_moe"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapted():
    """One tiny model of each architecture with its adapter (shared: discovery runs once per architecture)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model = tiny_model(arch)
            cache[arch] = (model, get_adapter(model))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_linear_layer_is_found_exactly_once(arch, adapted):
    """Compared with named_modules: each nn.Linear inside the blocks is quantizable or kept in full
    precision (MoE routers), exactly once; nothing outside the blocks (embeddings, lm_head) is listed."""
    model, adapter = adapted(arch)
    prefix = adapter.blocks_prefix() + "."
    in_blocks = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix))
    found = [n for n, _ in adapter.linear_layers()] + adapter.full_precision()
    assert len(found) == len(set(found))
    assert sorted(found) == in_blocks and in_blocks
    modules = dict(model.named_modules())
    assert all(modules[name] is layer for name, layer in adapter.linear_layers())
    assert len(adapter.blocks()) == 2
    assert adapter.max_context == (None if arch == "bloom" else 128)  # bloom (ALiBi) has no position limit


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_groups_share_an_input_and_follow_dataflow(arch, adapted):
    """Layers of a group receive the very same input tensor; groups' inputs appear in list order."""
    model, adapter = adapted(arch)
    block = adapter.blocks()[0]
    groups = adapter.linear_groups(block)
    inputs, order = {}, []

    def hook(m, args, name):
        inputs.setdefault(name, args[0])
        order.append(name)

    hooks = [layer.register_forward_pre_hook(lambda m, a, n=name: hook(m, a, n))
             for g in groups for name, layer in g]
    with torch.no_grad():
        model(torch.randint(0, 90, (1, 24), generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    group_of = {n: gi for gi, g in enumerate(groups) for n, _ in g}
    for g in groups:
        seen = [inputs[n] for n, _ in g if n in inputs]
        assert all(x is seen[0] for x in seen), [n for n, _ in g]
    if arch not in MOE:  # experts run in routing order; every other group's first use is in list order
        first_use = list(dict.fromkeys(group_of[n] for n in order))  # groups in the order their input appears
        assert first_use == sorted(first_use) == list(range(len(groups)))
        assert set(order) == set(group_of)
    if arch in PARALLEL:
        assert any(adapter.layer_kind(n) == "attn" for n, _ in groups[0])
        assert any(adapter.layer_kind(n) == "mlp" for n, _ in groups[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_known_first_and_last_layers(arch, adapted):
    _, adapter = adapted(arch)
    groups = adapter.linear_groups(adapter.blocks()[0])
    assert len(groups) == 4
    names = [n for g in groups for n, _ in g]
    assert names[0] == EXPECTED_FIRST[arch] and names[-1] == EXPECTED_LAST[arch]


@pytest.mark.parametrize("hint", sorted(HINTS))
def test_explicit_hints_agree_with_discovery(hint):
    """The hints exist for when the recording forward cannot run; each must say what discovery finds."""
    family = HINTS[hint]
    for model_type in family.model_types:
        try:
            model = tiny_model(model_type)
        except KeyError:
            continue  # no tiny config for this type in the tests
        found = discover(model)
        assert found.blocks_path == family.blocks_path, model_type
        assert found.groups == family.groups and found.per_block is None, model_type


def test_hint_is_used_when_the_recording_forward_fails():
    model = tiny_model("llama")
    original = model.forward

    def broken(*a, **k):
        raise RuntimeError("no dummy forward")

    model.forward = broken
    family = discover(model)
    assert family.groups == HINTS["llama"].groups
    model.forward = original


def test_recording_forward_failure_without_a_hint_is_named():
    model = tiny_model("granite")
    model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(AdvisorError, match="could not discover the layer order of the granite model.*boom"):
        get_adapter(model)


def test_gpt2_conv1d_replaced_without_changing_outputs():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        get_adapter(model)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())


@pytest.mark.parametrize("arch", sorted(MOE))
def test_fused_experts_are_sliced_per_expert_without_copy_or_change(arch):
    model = tiny_model(arch)
    fused = model.model.layers[0].mlp.experts
    storage = fused.gate_up_proj.data.untyped_storage().data_ptr()
    ids = torch.randint(0, 90, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        adapter = get_adapter(model)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    sliced = model.model.layers[0].mlp.experts
    assert isinstance(sliced, SlicedExperts) and sliced.num_experts == 4
    assert sliced.experts[2].gate_up.weight.untyped_storage().data_ptr() == storage  # a view, not a copy
    names = [n for n, _ in adapter.linear_layers()]
    assert sum(".experts.experts." in n for n in names) == 2 * 4 * 2  # 2 blocks x 4 experts x (gate_up, down)


def test_unreached_experts_are_placed_by_analogy():
    """With one routed token most experts get no input during discovery; they are still listed, grouped
    like the reached ones (gate_up alone, then down)."""
    from advisor.models.adapters import _place_unreached

    groups = [["attn.q", "attn.k"], ["attn.o"], ["moe.experts.1.gate_up"], ["moe.experts.1.down"]]
    missing = ["moe.experts.0.gate_up", "moe.experts.0.down", "moe.experts.2.gate_up", "moe.experts.2.down"]
    listed = ["attn.q", "attn.k", "attn.o"] + [f"moe.experts.{e}.{p}" for e in range(3) for p in ("gate_up", "down")]
    placed = _place_unreached(groups, missing, listed)
    assert sorted(p for g in placed for p in g) == sorted(listed)
    assert ["moe.experts.0.gate_up"] in placed and ["moe.experts.0.down"] in placed
    assert placed.index(["moe.experts.0.gate_up"]) == placed.index(["moe.experts.1.gate_up"]) + 1


def test_unknown_fused_expert_layout_is_refused_by_name():
    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.register_parameter("w_extra", nn.Parameter(torch.zeros(4, 8, 8)))
    with pytest.raises(AdvisorError, match=r"model\.layers\.0\.mlp\.experts .*MixtralExperts.*w_extra.*not supported"):
        get_adapter(model)


def test_fused_experts_with_another_computation_are_refused():
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts.act_fn = nn.Identity()  # the sliced copy would compute gate * up, the fused one too: break it instead
    cls = type(experts)
    orig = cls.forward
    cls.forward = lambda self, h, i, w: orig(self, h, i, w) * 2
    try:
        with pytest.raises(AdvisorError, match="does not compute the standard gated expert"):
            get_adapter(model)
    finally:
        cls.forward = orig


def test_tied_embeddings_are_never_quantized(adapted):
    model, adapter = adapted("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    weights = {id(layer.weight) for _, layer in adapter.linear_layers()}
    assert id(model.lm_head.weight) not in weights


def test_architecture_without_blocks_is_named():
    class Dummy(nn.Module):
        class config:  # noqa: N801
            model_type = "mamba"
            num_hidden_layers = 3

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    with pytest.raises(AdvisorError, match=r"unsupported architecture 'mamba'.*ModuleList of 3 blocks.*lengths \[2\]"):
        get_adapter(Dummy())


def test_contradicting_layer_count_is_refused():
    model = tiny_model("llama")
    model.config.num_hidden_layers = 5
    with pytest.raises(AdvisorError, match="ModuleList of 5 blocks"):
        get_adapter(model)


def test_tiny_configs_cover_the_issue_architectures():
    required = {"gemma3_text", "phi3", "qwen3", "granite", "cohere", "falcon", "bloom", "gpt_bigcode", "starcoder2",
                "stablelm", "gptj", "mixtral"}
    assert required <= set(ALL_ARCHS) and len(set(ALL_ARCHS)) >= 15 and len(MOE & set(ALL_ARCHS)) >= 2
    assert all(tiny_config(a).model_type == a for a in ALL_ARCHS)
