"""Architecture adapters: where the decoder blocks are and which linear layers each block holds.

Nothing here is a per-architecture table. For any causal LM the structure is discovered:

- **Blocks**: the ``nn.ModuleList`` whose length is the config's layer count (``num_hidden_layers``,
  ``n_layer``, ...) and that holds the most parameters.
- **Normalisation** (before anything else looks at the blocks): GPT-2-style ``Conv1D`` projections
  (weight stored transposed) become equivalent ``nn.Linear`` modules, and the fused 3-D expert tensors
  of recent transformers MoE layers (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) become one
  ``nn.Linear`` pair per expert whose weights are views of the same storage (no copy), checked
  numerically against the fused module; a fused layout that does not match is refused by name.
- **Linear layers**: every ``nn.Linear`` inside a block, except MoE routers (a linear whose outputs are
  the experts' logits), which stay in full precision as every quantization recipe keeps them.
  Linear layers that share their weight with the embeddings (tied) are never quantized.
- **Groups and order**: one short forward pass with a pre-hook on every linear layer records which
  layers receive the *same input tensor* (q/k/v; gate/up; in parallel-attention blocks q/k/v and the
  MLP input) and in which order inputs become available. That is the order a block-sequential
  quantizer needs and the sharing that lets one set of calibration statistics serve a group. Experts
  that no token reached during that pass are placed by analogy with experts that were reached.

Explicit hints (:data:`HINTS`) exist only for when the recording forward cannot run (a model whose
forward fails on a dummy input); tests check that every hint agrees with discovery.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advisor.models.errors import AdvisorError

ATTN, MLP = "attn", "mlp"
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_ATTN_NAMES = {"attn", "attention", "self_attn", "self_attention", "attn_layer", "mixer"}


@dataclass(frozen=True)
class Family:
    """The structure of one architecture: blocks path and, per block, linear layers grouped by shared input.

    ``groups`` describes every block; ``per_block`` (when given) one entry per block, for architectures
    whose blocks differ (dense and MoE blocks mixed). ``full_precision`` lists linear layers inside the
    blocks that are kept unquantized (MoE routers), relative to a block."""

    name: str
    model_types: tuple[str, ...]
    blocks_path: str  # attribute path from the *CausalLM module to the ModuleList of blocks
    groups: tuple[tuple[str, ...], ...]  # linear layer paths inside a block, grouped by shared input
    per_block: tuple[tuple[tuple[str, ...], ...], ...] | None = None
    full_precision: tuple[tuple[str, ...], ...] | None = None  # per block


# Explicit structure, used only when the recording forward cannot run; tests check each agrees with
# what discovery finds on a model of that type.
HINTS: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "smollm3", "olmo", "olmo2"),
               "model.layers",
               (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))),
        Family("opt", ("opt",), "model.decoder.layers",
               (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",),
                ("fc2",))),
        Family("gpt2", ("gpt2",), "transformer.h",
               (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))),
        Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers",
               (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",))),
    ]
}
_HINT_BY_MODEL_TYPE = {mt: f for f in HINTS.values() for mt in f.model_types}


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a packed QuantLinear that stands in for one (has in/out features and no children)."""
    if isinstance(module, nn.Linear):
        return True
    return (hasattr(module, "in_features") and hasattr(module, "out_features") and type(module).__name__ != "Conv1D"
            and not isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d)) and not list(module.children()))


def text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:  # noqa: BLE001 - an odd config: use it as it is
            return cfg
    return cfg


def config_int(cfg: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# -- normalisation -----------------------------------------------------------------------------
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


def _view_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear whose weight (and bias) are the given tensors themselves (views: no copy)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class _Expert(nn.Module):
    def __init__(self, gate_up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.gate_up, self.down = gate_up, down


class SlicedExperts(nn.Module):
    """Fused 3-D MoE experts as one (gate_up, down) ``nn.Linear`` pair per expert, same forward.

    ``forward(hidden_states, top_k_index, top_k_weights)`` is the transformers experts interface: each
    token's output is the routing-weighted sum of ``down(act(gate) * up)`` over its chosen experts."""

    def __init__(self, experts: list[_Expert], act_fn: nn.Module):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.act_fn = act_fn
        self.num_experts = len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                **_: Any) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index[top_k_index < self.num_experts]).tolist()
        for e in hit:
            token_idx, top_k_pos = torch.where(top_k_index == e)
            expert = self.experts[e]
            gate, up = expert.gate_up(hidden_states[token_idx]).chunk(2, dim=-1)
            out = expert.down(self.act_fn(gate) * up) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def _fused_3d_params(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def _slice_experts(module: nn.Module, where: str, hidden: int | None) -> SlicedExperts:
    """Per-expert linear layers over the fused tensors' storage, verified against the fused forward."""
    params = dict(module.named_parameters(recurse=False))
    fused = _fused_3d_params(module)
    standard = set(fused) == {"gate_up_proj", "down_proj"} and set(params) <= {
        "gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"} and hasattr(module, "act_fn")
    if not standard:
        raise AdvisorError(
            f"{where} ({type(module).__name__}) holds fused 3-D expert weights {sorted(fused)} in a layout advisor "
            "cannot split into per-expert linear layers (it handles gate_up_proj + down_proj with an act_fn); "
            "this MoE architecture is not supported")
    gu, down = params["gate_up_proj"], params["down_proj"]
    gu_b, down_b = params.get("gate_up_proj_bias"), params.get("down_proj_bias")
    n_exp = gu.shape[0]
    # (E, 2I, H) is the nn.Linear layout; (E, H, 2I) the transposed one some models use
    transposed = bool(getattr(module, "is_transposed", False)) or (hidden is not None and gu.shape[-1] != hidden
                                                                  and gu.shape[-2] == hidden)
    experts = []
    for e in range(n_exp):
        w_gu, w_down = (gu.data[e].t(), down.data[e].t()) if transposed else (gu.data[e], down.data[e])
        experts.append(_Expert(_view_linear(w_gu, None if gu_b is None else gu_b.data[e]),
                               _view_linear(w_down, None if down_b is None else down_b.data[e])))
    sliced = SlicedExperts(experts, module.act_fn)
    _check_same_experts(module, sliced, where, n_exp, w_gu.shape[1])
    return sliced


@torch.no_grad()
def _check_same_experts(fused: nn.Module, sliced: SlicedExperts, where: str, n_exp: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(0)
    p = next(fused.parameters())
    k = min(2, n_exp)
    n_tok = max(4, 2 * n_exp // k)
    x = torch.randn(n_tok, hidden, generator=gen).to(device=p.device, dtype=p.dtype)
    idx = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(n_tok)]).to(p.device)
    w = torch.rand(n_tok, k, generator=gen).to(device=p.device, dtype=p.dtype)
    try:
        a, b = fused(x, idx, w), sliced(x, idx, w)
        ok = a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3 * (a.float().abs().max().item() + 1e-6))
    except Exception as e:  # noqa: BLE001 - a forward with another signature is a layout we do not know
        raise AdvisorError(f"{where} ({type(fused).__name__}): fused MoE experts with an unknown forward "
                           f"({type(e).__name__}: {e}); this MoE architecture is not supported") from e
    if not ok:
        raise AdvisorError(f"{where} ({type(fused).__name__}) does not compute the standard gated expert "
                           "act(gate) * up -> down, so advisor cannot quantize it per expert; this MoE architecture "
                           "is not supported")


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


def normalise_block(block: nn.Module, where: str, hidden: int | None) -> None:
    """Conv1D -> nn.Linear and fused 3-D experts -> per-expert nn.Linear, inside one block, in place."""
    for path, module in list(block.named_modules()):
        if not path:
            if _fused_3d_params(module):
                raise AdvisorError(f"{where} holds 3-D weights directly; advisor cannot split them into linear layers")
            continue
        if type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2:
            _set_child(block, path, _conv1d_to_linear(module))
        elif _fused_3d_params(module):
            _set_child(block, path, _slice_experts(module, f"{where}.{path}", hidden))


# -- discovery ---------------------------------------------------------------------------------
def find_blocks(model: nn.Module) -> str:
    """Attribute path of the decoder blocks' ModuleList.

    Raises:
        AdvisorError: no ModuleList matches the config's layer count (names what was looked for).
    """
    cfg = text_config(model)
    n_layers = config_int(cfg, _LAYER_COUNT_KEYS)
    best, best_params = None, -1
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name]
    for name, m in lists:
        if len(m) == 0 or (n_layers is not None and len(m) != n_layers):
            continue
        if not any(_is_linear(x) or type(x).__name__ == "Conv1D" or _fused_3d_params(x) for x in m[0].modules()):
            continue
        n = sum(p.numel() for p in m.parameters())
        if n > best_params or (n == best_params and best is not None and len(name) < len(best)):
            best, best_params = name, n
    if best is None:
        model_type = getattr(cfg, "model_type", None)
        sizes = sorted({len(m) for _, m in lists})
        raise AdvisorError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}): no list of decoder blocks with "
            f"linear layers found (looked for an nn.ModuleList of {n_layers if n_layers else 'any number of'} blocks, "
            f"from the config's {'/'.join(_LAYER_COUNT_KEYS)}; the model's module lists have lengths "
            f"{sizes or 'none'}). advisor quantizes decoder-only transformers whose blocks hold linear layers")
    return best


def _router_paths(block: nn.Module, n_experts: int | None) -> set[str]:
    """Linear layers whose outputs are the experts' routing logits (kept in full precision)."""
    if not n_experts:
        return set()
    out = set()
    for path, m in block.named_modules():
        leaf = path.rpartition(".")[2]
        if _is_linear(m) and m.out_features == n_experts and ("gate" in leaf or "router" in leaf):
            if "experts" not in path.split("."):
                out.add(path)
    return out


def _numbers_to_hash(path: str) -> str:
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1#", path)


def _indices(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split(".") if p.isdigit())


def record_groups(model: nn.Module, blocks: list[nn.Module], linears: list[list[str]], n_tokens: int
                  ) -> list[list[list[str]]]:
    """Per block, the linear layers grouped by the input tensor they received, in order of first input.

    One forward of ``n_tokens`` deterministic token ids, a pre-hook on every linear layer; the input
    tensors are kept alive for the pass so that object identity means "the same input"."""
    cfg = text_config(model)
    vocab = config_int(cfg, ("vocab_size",)) or 2
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    keep: list[torch.Tensor] = []
    seen: list[dict[str, int]] = [{} for _ in blocks]  # path -> input key
    input_key: dict[int, int] = {}
    handles = []

    def hook(module, args, kwargs, b=0, path=""):
        x = args[0] if args else next(iter(kwargs.values()))
        if path in seen[b]:
            return
        if id(x) not in input_key:
            keep.append(x)
            input_key[id(x)] = len(input_key)
        seen[b][path] = input_key[id(x)]

    try:
        for b, block in enumerate(blocks):
            for path in linears[b]:
                handles.append(block.get_submodule(path).register_forward_pre_hook(
                    lambda m, a, k, b=b, p=path: hook(m, a, k, b, p), with_kwargs=True))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        keep.clear()

    out = []
    for b in range(len(blocks)):
        order: dict[int, list[str]] = {}
        for path, key in seen[b].items():  # dict order = call order
            order.setdefault(key, []).append(path)
        groups = list(order.values())
        missing = [p for p in linears[b] if p not in seen[b]]
        out.append(_place_unreached(groups, missing, linears[b]))
    return out


def _place_unreached(groups: list[list[str]], missing: list[str], listed: list[str]) -> list[list[str]]:
    """Linear layers the recording pass did not reach (experts no token was routed to): grouped like reached
    layers of the same pattern (``experts.#.gate_up``), each new group placed after its analogue."""
    if not missing:
        return groups
    pattern_group = {}
    for gi, g in enumerate(groups):
        for p in g:
            pattern_group.setdefault(_numbers_to_hash(p), gi)
    by_key: dict[tuple, list[str]] = {}
    for p in missing:
        pat = _numbers_to_hash(p)
        gi = pattern_group.get(pat)
        by_key.setdefault((gi, _indices(p)) if gi is not None else (None, p), []).append(p)
    result = [list(g) for g in groups]
    inserts: dict[int | None, list[list[str]]] = {}
    for (gi, _), paths in by_key.items():
        inserts.setdefault(gi, []).append(sorted(paths, key=listed.index))
    final = []
    for gi, g in enumerate(result):
        final.append(g)
        final.extend(inserts.get(gi, []))
    final.extend(inserts.get(None, []))
    return final


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

    def block_index(self, block: nn.Module) -> int:
        for i, b in enumerate(self.blocks()):
            if b is block:
                return i
        raise ValueError("not a block of this model")

    def group_paths(self, index: int) -> tuple[tuple[str, ...], ...]:
        if self.family.per_block is not None:
            return self.family.per_block[index]
        return self.family.groups

    def full_precision(self) -> list[str]:
        """Full names of the linear layers inside blocks that are deliberately not quantized (MoE routers)."""
        if not self.family.full_precision:
            return []
        return [f"{self.family.blocks_path}.{i}.{p}" for i, paths in enumerate(self.family.full_precision)
                for p in paths]

    def linear_groups(self, block: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        """Linear layers of one block in block-sequential order, grouped by shared input.

        Returns:
            e.g. ``[[("self_attn.q_proj", Linear), ("self_attn.k_proj", ...), ...], [("self_attn.o_proj", ...)], ...]``
        """
        groups = []
        for paths in self.group_paths(self.block_index(block)):
            group = []
            for path in paths:
                layer = _get(block, path)
                if not _is_linear(layer):
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

    def n_linear_per_block(self) -> list[int]:
        return [sum(len(g) for g in self.group_paths(i)) for i in range(len(self.blocks()))]

    @staticmethod
    def layer_kind(path: str) -> str:
        """``"attn"`` for a projection inside the attention module, else ``"mlp"`` (MLP, experts)."""
        parts = path.split(".")[:-1]
        return ATTN if any(p in _ATTN_NAMES or "attn" in p or "attention" in p for p in parts) else MLP

    @property
    def max_context(self) -> int | None:
        cfg = text_config(self.model)
        return config_int(cfg, ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx",
                                "seq_length"))

    # -- normalisation -------------------------------------------------------------------------
    def prepare(self) -> "Adapter":
        """Replace GPT-2 Conv1D by ``nn.Linear`` and fused 3-D experts by per-expert ``nn.Linear`` (views)."""
        hidden = config_int(text_config(self.model), ("hidden_size", "n_embd", "d_model"))
        for i, block in enumerate(self.blocks()):
            normalise_block(block, f"{self.family.blocks_path}.{i}", hidden)
        return self


def _tied_weights(model: nn.Module) -> set[int]:
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            m = getattr(model, getter)()
        except Exception:  # noqa: BLE001 - models without the accessor
            m = None
        if m is not None and getattr(m, "weight", None) is not None:
            ids.add(id(m.weight))
    return ids


def discover(model: nn.Module) -> Family:
    """The structure of ``model`` (normalised in place first: see the module docstring).

    Raises:
        AdvisorError: no decoder blocks, no linear layers, or a module layout advisor cannot split.
    """
    cfg = text_config(model)
    model_type = str(getattr(cfg, "model_type", None) or type(model).__name__)
    blocks_path = find_blocks(model)
    adapter = Adapter(model, Family(model_type, (model_type,), blocks_path, ()))
    adapter.prepare()
    blocks = adapter.blocks()
    n_experts = config_int(cfg, _EXPERT_COUNT_KEYS)
    tied = _tied_weights(model)
    linears, routers = [], []
    for block in blocks:
        r = _router_paths(block, n_experts)
        routers.append(tuple(sorted(r)))
        linears.append([p for p, m in block.named_modules()
                        if p and _is_linear(m) and p not in r and id(getattr(m, "weight", None)) not in tied])
    if not any(linears):
        raise AdvisorError(f"the {model_type} model's blocks ({blocks_path}) hold no nn.Linear layers to quantize")
    top_k = config_int(cfg, ("num_experts_per_tok", "moe_topk", "top_k")) or 1
    n_tokens = 16 if not n_experts else min(256, max(32, 4 * n_experts // top_k))
    try:
        per_block = record_groups(model, blocks, linears, n_tokens)
    except Exception as e:  # noqa: BLE001 - a model whose forward fails on a dummy input
        hint = _HINT_BY_MODEL_TYPE.get(model_type)
        if hint is None or hint.blocks_path != blocks_path:
            raise AdvisorError(
                f"could not discover the layer order of the {model_type} model: its forward pass on {n_tokens} "
                f"dummy tokens failed ({type(e).__name__}: {str(e)[:200]}), and advisor has no explicit hint for "
                f"{model_type!r} (hints exist for {', '.join(sorted(_HINT_BY_MODEL_TYPE))})") from e
        return Family(model_type, (model_type,), blocks_path, hint.groups,
                      full_precision=tuple(routers) if any(routers) else None)
    groups = tuple(tuple(tuple(g) for g in b) for b in per_block)
    same = all(g == groups[0] for g in groups)
    return Family(model_type, (model_type,), blocks_path, groups[0], per_block=None if same else groups,
                  full_precision=tuple(routers) if any(routers) else None)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a transformers causal LM, discovered from its module tree and config.

    Raises:
        AdvisorError: no decoder blocks or no linear layers (names what is missing), or a fused layer
            layout that cannot be split into linear layers.
    """
    family = discover(model)
    adapter = Adapter(model, family)
    if not adapter.blocks():
        raise AdvisorError(f"the {family.name} model has no transformer blocks, so no linear layers to quantize")
    return adapter
