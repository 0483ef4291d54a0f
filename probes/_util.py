"""Helpers shared by the probes: layer inventory, input checks, model-state guards, losses."""
from __future__ import annotations

import contextlib
import logging
import math
import re
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

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
    """Mean next-token NLL per window, float32 (batch,); ``targets`` (batch, seq_len - 1) default ids[:, 1:].

    Differentiable; materialises the full ``(batch, seq_len, vocab)`` logits (the reference of
    ``chunked_window_nll``, and what the Hessian's double backward runs through on its few tokens).
    """
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    targets = ids[:, 1:] if targets is None else targets
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).mean(dim=1)


# Bytes of float32 logits one chunk of tokens may hold (``chunk_tokens``): 64 MiB, i.e. 64 tokens of a
# 262k vocabulary, 340 of a 49k one.
LOGIT_CHUNK_BYTES = 64 << 20


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of the head so that its float32 logits stay under ``LOGIT_CHUNK_BYTES``."""
    return max(16, LOGIT_CHUNK_BYTES // (4 * max(1, int(vocab))))


@dataclass(frozen=True)
class HeadSplit:
    """A causal LM cut before its output head: ``model(ids).logits == logits(body(ids))``.

    ``body`` returns the final hidden states (after the last norm); ``logits`` applies the output
    projection and the model's logit transform (Gemma's ``final_logit_softcapping``, Cohere's
    ``logit_scale``). ``split_head`` checks the identity on the model before handing one out.
    """

    body: nn.Module
    head: nn.Module
    softcap: float | None = None
    scale: float | None = None

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=ids, use_cache=False).last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(h))

    def transform(self, out: torch.Tensor) -> torch.Tensor:
        """The elementwise logit transform after the projection (identity for most models)."""
        if self.scale is not None:
            out = out * self.scale
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    @property
    def linear(self) -> nn.Linear | None:
        """The head when it is a plain ``nn.Linear`` (its rows can be sliced by vocabulary), else None."""
        head = self.head
        return head if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward else None


_SPLITS: "weakref.WeakKeyDictionary[nn.Module, HeadSplit | None]" = weakref.WeakKeyDictionary()


def split_head(model: nn.Module, probe_ids: torch.Tensor | None = None) -> HeadSplit | None:
    """The model's ``HeadSplit``, or None when it cannot be cut generically (then callers use full logits).

    The cut is the transformers convention (``model.base_model`` -> ``last_hidden_state``,
    ``get_output_embeddings()``); it is verified once per model by comparing the logits both ways on
    the first 8 tokens of ``probe_ids`` (a few tokens of a model whose head does more, e.g. a hidden
    state rescaled before the head, fail the check and fall back).
    """
    if model in _SPLITS:
        return _SPLITS[model]
    split = None
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if body is not None and body is not model and isinstance(head, nn.Module):
        cand = HeadSplit(body, head, getattr(config, "final_logit_softcapping", None),
                         getattr(config, "logit_scale", None))
        ids = (probe_ids[:1, :8] if probe_ids is not None else torch.zeros(1, 8, dtype=torch.long))
        ids = ids.to(device_of(model))
        try:
            with torch.no_grad():
                want = model(input_ids=ids, use_cache=False).logits.float()
                got = cand.logits(cand.hidden(ids)).float()
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                split = cand
            else:
                log.info("output head of %s is not the generic cut; probes use full logits", type(model).__name__)
        except (TypeError, AttributeError, ValueError, RuntimeError) as e:
            log.info("cannot cut %s before its head (%s); probes use full logits", type(model).__name__, e)
    _SPLITS[model] = split
    return split


def chunked_nll_from_hidden(split: HeadSplit, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (N,) float32 of hidden states ``h`` (N, d) for ``targets`` (N,), without an
    ``(N, vocab)`` tensor. Not differentiable.

    A plain linear head runs on slices of the vocabulary (all tokens against ``vocab_step(N)`` rows of
    the head at a time, the log-sum-exp accumulated online): every head row is read once and each
    product is a large, well-shaped GEMM, 1.6x faster than chunks of 64 tokens on a 262k vocabulary.
    Other heads run on chunks of ``chunk_tokens`` tokens."""
    linear = split.linear
    if linear is not None:
        return _nll_by_vocab(split, linear, h, targets)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    step = chunk_tokens(split.head.weight.shape[0] if hasattr(split.head, "weight") else 1)
    for i in range(0, h.shape[0], step):
        logits = split.logits(h[i : i + step]).float()
        out[i : i + step] = F.cross_entropy(logits, targets[i : i + step], reduction="none")
    return out


def vocab_step(n_tokens: int) -> int:
    """Head rows per vocabulary slice so that the slice's float32 logits stay under ``LOGIT_CHUNK_BYTES``."""
    return max(16, LOGIT_CHUNK_BYTES // (4 * max(1, int(n_tokens))))


def _nll_by_vocab(split: HeadSplit, linear: nn.Linear, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``cross_entropy(split.logits(h), targets)`` over vocabulary slices with an online log-sum-exp."""
    n, vocab = h.shape[0], linear.weight.shape[0]
    step = vocab_step(n)
    top = torch.full((n,), -math.inf, dtype=torch.float32, device=h.device)  # running max of the logits
    total = torch.zeros(n, dtype=torch.float32, device=h.device)  # running sum of exp(logit - top)
    target_logit = torch.empty(n, dtype=torch.float32, device=h.device)
    rows = torch.arange(n, device=h.device)
    for v0 in range(0, vocab, step):
        bias = None if linear.bias is None else linear.bias[v0 : v0 + step]
        z = split.transform(F.linear(h, linear.weight[v0 : v0 + step], bias)).float()
        here = (targets >= v0) & (targets < v0 + z.shape[1])
        if bool(here.any()):
            target_logit[here] = z[rows[here], targets[here] - v0]
        new_top = torch.maximum(top, z.amax(dim=1))
        shift = torch.where(torch.isfinite(new_top), new_top, torch.zeros_like(new_top))
        total = total * torch.exp(top - shift) + torch.exp(z - shift[:, None]).sum(dim=1)
        top = new_top
    return top + torch.log(total) - target_logit


def chunked_window_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``token_nll`` without gradients and without the full logits: (batch,) float32.

    The hidden states of the whole batch are computed once and the head runs on chunks of tokens, so
    the float32 logits held at once are ``chunk_tokens(vocab)`` rows, not ``batch * seq_len``; models
    that cannot be cut (``split_head``) take the full-logits path.
    """
    with torch.no_grad():
        split = split_head(model, ids)
        if split is None:
            return token_nll(model, ids)
        h = split.hidden(ids)[:, :-1]
        nll = chunked_nll_from_hidden(split, h.reshape(-1, h.shape[-1]), ids[:, 1:].reshape(-1))
        return nll.view(ids.shape[0], -1).mean(dim=1)


def chunked_nll_backward(split: HeadSplit, h: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d sum(weights * nll) / dh, nll)`` for hidden states ``h`` (N, d) without the full logits.

    Each chunk's logits are built, differentiated with respect to its slice of ``h`` and dropped; the
    returned gradient (N, d) is then pushed through the body with one ``autograd.grad`` call.
    """
    hd = h.detach()
    grad = torch.zeros_like(hd, dtype=torch.float32)
    nll = torch.empty(hd.shape[0], dtype=torch.float32, device=hd.device)
    step = chunk_tokens(split.head.weight.shape[0] if hasattr(split.head, "weight") else 1)
    for i in range(0, hd.shape[0], step):
        part = hd[i : i + step].clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(split.logits(part).float(), targets[i : i + step], reduction="none")
            (g,) = torch.autograd.grad((loss * weights[i : i + step]).sum(), part)
        grad[i : i + step] = g.float()
        nll[i : i + step] = loss.detach()
    return grad.to(h.dtype), nll


def _batched_window_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """``token_nll`` of ``ids`` in batches of ``batch_size`` windows, one (batch,) tensor per batch."""
    dev = device_of(model)
    for i in range(0, ids.shape[0], batch_size):
        yield chunked_window_nll(model, ids[i : i + batch_size].to(dev))


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


@contextlib.contextmanager
def swapped_weights(layers: Sequence[LayerInfo], make: Callable[..., torch.Tensor], *extra) -> Iterator[None]:
    """Each layer computes with ``make(W, layer_name, *extra)`` instead of ``W`` during its own forward call.

    A pre-hook swaps ``weight.data`` for the replacement (in the weight's dtype) and a forward hook
    swaps the original storage back, so only one layer's replacement exists at a time, the model is
    never copied, and the weights are restored bitwise. For layers called once per forward pass.
    Weights that are views into a fused tensor (MoE experts) are replaced in place for the whole block
    instead, and restored from a copy of those layers.
    """
    lazy = [li for li in layers if not _shares_storage(li.module.weight)]
    eager = [li for li in layers if _shares_storage(li.module.weight)]
    handles = []
    for li in lazy:
        module = li.module

        def pre(mod, args, name=li.name):
            original = mod.weight.data
            mod._probe_original = original
            mod.weight.data = make(original, name, *extra).to(original.dtype)

        def post(mod, args, out):
            mod.weight.data = mod.__dict__.pop("_probe_original")

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    # views into a fused tensor (MoE experts, read by the fused forward, not through these modules):
    # written in place for the whole block and restored from a copy of those layers only
    kept = {}
    try:
        with torch.no_grad():
            for li in eager:
                w = li.module.weight
                kept[li.name] = w.detach().clone()
                w.copy_(make(kept[li.name], li.name, *extra).to(w.dtype))
        yield
    finally:
        for h in handles:
            h.remove()
        for li in lazy:  # an exception inside a forward pass skips its post hook
            original = li.module.__dict__.pop("_probe_original", None)
            if original is not None:
                li.module.weight.data = original
        with torch.no_grad():
            for li in eager:
                if li.name in kept:
                    li.module.weight.copy_(kept[li.name])


def _shares_storage(w: torch.Tensor) -> bool:
    """A weight that is a view into a larger tensor (e.g. one expert of a fused MoE weight)."""
    return w.untyped_storage().nbytes() > w.numel() * w.element_size()


def spec_key(dtype: str, group_size: int | None, block_size: int | None = None, symmetric: bool = True) -> str:
    """Feature-key fragment of a (dtype, group, symmetry) format: ``int4_g128``, ``int8_pc`` (per channel),
    ``mxfp4``, ``int4_g128_asym`` (integer zero point per group)."""
    if block_size is not None:
        return dtype
    key = f"{dtype}_pc" if group_size is None else f"{dtype}_g{group_size}"
    return key if symmetric else f"{key}_asym"


def sigma_key(sigma: float) -> str:
    """``0.0025 -> '0.25pct'`` written without a dot: ``s0p25pct``."""
    pct = f"{sigma * 100:.3g}".replace(".", "p")
    return f"s{pct}pct"
