"""Helpers shared by the probes: layer inventory, input checks, model-state guards, losses."""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from advisor.models.data import Windows
from advisor.models.errors import AdvisorError

log = logging.getLogger(__name__)

ATTN, MLP = "attn", "mlp"


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable linear layer.

    Attributes:
        name: full module name (``model.layers.3.mlp.down_proj``).
        module: the ``nn.Linear``.
        block: index of its transformer block.
        kind: ``"attn"`` (q/k/v and output projection) or ``"mlp"``.
        role: path inside the block (``mlp.down_proj``).
    """

    name: str
    module: nn.Linear
    block: int
    kind: str
    role: str
    group: int = 0  # index of its shared-input group inside the block (0: q/k/v, 1: o, 2: gate/up, 3: down)

    @property
    def n_params(self) -> int:
        return self.module.weight.numel()


def layer_infos(loaded) -> list[LayerInfo]:
    """Every linear layer of the model in block-sequential order, with its block and kind.

    The adapters list each block's layers grouped by shared input, in dataflow order; a layer's kind
    (attention or MLP) is the adapter's ``layer_kind`` of its path.

    Raises:
        AdvisorError: the model has no linear layers.
    """
    adapter = loaded.adapter
    prefix = adapter.blocks_prefix()
    out = []
    for b, block in enumerate(adapter.blocks()):
        for g, group in enumerate(adapter.linear_groups(block)):
            for path, layer in group:
                out.append(LayerInfo(f"{prefix}.{b}.{path}", layer, b,
                                     ATTN if adapter.layer_kind(path) == "attn" else MLP, path, g))
    if not out:
        raise AdvisorError("the model has no linear layers to probe (no transformer blocks with nn.Linear "
                           "projections); probes need at least one")
    return out


def select_layers(layers: list[LayerInfo], patterns: Sequence[str] | None) -> list[LayerInfo]:
    """Layers whose name matches any regex in ``patterns`` (all when ``None``)."""
    if not patterns:
        return layers
    chosen = [li for li in layers if any(re.search(p, li.name) for p in patterns)]
    if not chosen:
        raise AdvisorError(f"no linear layer matches {list(patterns)}; layers look like {layers[0].name!r}")
    return chosen


def check_inputs(loaded, calib: Windows) -> None:
    """Clear errors for bad input: no linear layers, empty or malformed calibration windows."""
    if calib is None or not isinstance(getattr(calib, "ids", None), torch.Tensor):
        raise AdvisorError("probes need calibration windows (models.data.Windows)")
    if calib.ids.dim() != 2 or calib.ids.shape[0] == 0 or calib.ids.shape[1] < 2:
        raise AdvisorError(f"the calibration set is empty or too short: windows of shape {tuple(calib.ids.shape)}; "
                           "probes need at least one window of 2 or more tokens")
    layer_infos(loaded)


def first_windows(calib: Windows, n: int | None) -> torch.Tensor:
    """The first ``n`` calibration windows (all when ``None`` or more than available), (n, seq_len)."""
    ids = calib.ids
    return ids if n is None else ids[: max(1, min(int(n), ids.shape[0]))]


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def token_nll(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token NLL per window, float32 (batch,); ``targets`` (batch, seq_len - 1) default ids[:, 1:]."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:] if targets is None else targets
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).mean(dim=1)


def _batched_window_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """``token_nll`` of ``ids`` in batches of ``batch_size`` windows, one (batch,) tensor per batch."""
    dev = device_of(model)
    for i in range(0, ids.shape[0], batch_size):
        yield token_nll(model, ids[i : i + batch_size].to(dev))


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean token NLL of each window of ``ids``, float32 on the CPU (n,)."""
    return torch.cat([part.cpu() for part in _batched_window_nll(model, ids, batch_size)])


@torch.no_grad()
def mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean token NLL over windows ``ids`` (all windows have equal length, so the mean of window means)."""
    total = 0.0
    for part in _batched_window_nll(model, ids, batch_size):
        total += float(part.sum())
    return total / ids.shape[0]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``requires_grad`` flags and train/eval mode on exit; run inside in eval mode."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def grad_only(model: nn.Module, params: Sequence[torch.Tensor]) -> None:
    """Make only ``params`` require gradients (the embeddings and norms get none: cheaper backward)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


@contextlib.contextmanager
def double_backward_attention(model: nn.Module) -> Iterator[str]:
    """Attention that supports double backward (Hessian-vector products), restored on exit.

    PyTorch's fused CPU attention kernels (flash / sdpa) have no double backward. Switch the model to
    the eager implementation when transformers allows it; otherwise force the math sdpa backend.
    Yields the implementation used.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switched = False
    if before not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            switched = True
        except (ValueError, ImportError, AttributeError, NotImplementedError) as e:
            log.info("cannot switch to eager attention (%s); using the math sdpa backend", e)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield "eager" if (switched or before in (None, "eager")) else f"{before}+math-sdpa"
    finally:
        if switched:
            model.set_attn_implementation(before)


@contextlib.contextmanager
def input_hooks(layers: Sequence[LayerInfo], fn) -> Iterator[None]:
    """Call ``fn(layer_info, x (tokens, in) detached)`` on every forward of each layer."""
    handles = []
    for li in layers:
        def hook(module, args, li=li):
            x = args[0].detach()
            fn(li, x.reshape(-1, x.shape[-1]))
        handles.append(li.module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def spec_key(dtype: str, group_size: int | None, block_size: int | None = None) -> str:
    """Feature-key fragment of a (dtype, group) pair: ``int4_g128``, ``int8_pc`` (per channel), ``mxfp4``."""
    if block_size is not None:
        return dtype
    return f"{dtype}_pc" if group_size is None else f"{dtype}_g{group_size}"


def sigma_key(sigma: float) -> str:
    """``0.0025 -> '0.25pct'`` written without a dot: ``s0p25pct``."""
    pct = f"{sigma * 100:.3g}".replace(".", "p")
    return f"s{pct}pct"
