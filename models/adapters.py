"""Architecture adapters: where the transformer blocks are and which linear layers each block holds.

A block-sequential quantizer needs the linear layers of a block in the order their inputs become
available: attention inputs (q/k/v share one input), then the attention output projection, then the
MLP input projections (gate/up share one input), then the MLP output projection. Each inner list
below is a group of layers that read the same input, so one set of calibration statistics serves it.

GPT-2 stores its projections as ``transformers.pytorch_utils.Conv1D`` (weight transposed);
:meth:`Adapter.prepare` swaps them for equivalent ``nn.Linear`` modules so everything downstream
(quantizers, probes, kernels) sees one kind of layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advisor.models.errors import AdvisorError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks_path: str  # attribute path from the *CausalLM module to the ModuleList of blocks
    groups: tuple[tuple[str, ...], ...]  # linear layer paths inside a block, grouped by shared input


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama",
            ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "smollm3", "olmo", "olmo2"),
            "model.layers",
            (
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"),
                ("mlp.down_proj",),
            ),
        ),
        Family(
            "opt",
            ("opt",),
            "model.decoder.layers",
            (
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.out_proj",),
                ("fc1",),
                ("fc2",),
            ),
        ),
        Family(
            "gpt2",
            ("gpt2",),
            "transformer.h",
            (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        ),
        Family(
            "gpt_neox",
            ("gpt_neox",),
            "gpt_neox.layers",
            (
                ("attention.query_key_value",),
                ("attention.dense",),
                ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",),
            ),
        ),
    ]
}

_BY_MODEL_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D computes x @ W + b with W (in, out); nn.Linear stores W^T (out, in)."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


class Adapter:
    """Uniform view of a causal LM's blocks and linear layers."""

    def __init__(self, model: nn.Module, family: Family):
        self.model = model
        self.family = family

    # -- structure ---------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, input to output."""
        return list(_get(self.model, self.family.blocks_path))

    def blocks_prefix(self) -> str:
        return self.family.blocks_path

    def linear_groups(self, block: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        """Linear layers of one block in block-sequential order, grouped by shared input.

        Returns:
            e.g. ``[[("self_attn.q_proj", Linear), ("self_attn.k_proj", ...), ...], [("self_attn.o_proj", ...)], ...]``
        """
        groups = []
        for paths in self.family.groups:
            group = []
            for path in paths:
                layer = _get(block, path)
                if not (isinstance(layer, nn.Linear) or hasattr(layer, "in_features")):  # or a packed QuantLinear
                    raise AdvisorError(
                        f"layer {path!r} of a {self.family.name} block is a {type(layer).__name__}, "
                        "not nn.Linear; call Adapter.prepare() after loading"
                    )
                group.append((path, layer))
            groups.append(group)
        return groups

    def linear_layers(self) -> list[tuple[str, nn.Linear]]:
        """Every quantizable linear layer, with its full module name, block by block."""
        out = []
        for i, block in enumerate(self.blocks()):
            for group in self.linear_groups(block):
                for path, layer in group:
                    out.append((f"{self.family.blocks_path}.{i}.{path}", layer))
        return out

    @property
    def max_context(self) -> int | None:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    # -- normalisation -------------------------------------------------------------------------
    def prepare(self) -> "Adapter":
        """Replace non-``nn.Linear`` projections (GPT-2 Conv1D) by equivalent ``nn.Linear`` modules."""
        for block in self.blocks():
            for paths in self.family.groups:
                for path in paths:
                    layer = _get(block, path)
                    if type(layer).__name__ == "Conv1D":
                        parent_path, _, attr = path.rpartition(".")
                        parent = _get(block, parent_path) if parent_path else block
                        setattr(parent, attr, _conv1d_to_linear(layer))
        return self


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a transformers causal LM, chosen by ``config.model_type``.

    Raises:
        AdvisorError: unsupported architecture (lists the supported ones) or no linear layers.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        supported = sorted(_BY_MODEL_TYPE)
        raise AdvisorError(
            f"unsupported architecture {model_type!r}: supported model types are {', '.join(supported)}. "
            "Add a Family to models/adapters.py to support it."
        )
    try:
        _get(model, family.blocks_path)
    except AttributeError as e:
        raise AdvisorError(f"{model_type} model has no {family.blocks_path!r}: {e}") from e
    adapter = Adapter(model, family).prepare()
    if not adapter.blocks():
        raise AdvisorError(f"the {model_type} model has no transformer blocks, so no linear layers to quantize")
    return adapter
