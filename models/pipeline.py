"""Block-sequential quantization driver: hooks, layer walking and devices live here, math in quantizers.

For each transformer block, input to output:
  1. for each group of linear layers sharing an input (q/k/v, then o, then gate/up, then down), run
     the block on the calibration inputs with the earlier groups already quantized ("true sequential"),
     collecting only the statistics the method needs (H = sum x x^T, mean |x|) at the group's input,
     and stopping the forward pass right there;
  2. quantize the group's layers and swap them for packed ``QuantLinear`` modules (or, with
     ``pack=False``, write the dequantized weights back: "fake quantization");
  3. run the quantized block once more to produce the next block's inputs.
With packing, a block's layers keep their dequantized weights (dense matmuls) while the block's
statistics passes run, and are swapped for packed modules when the block is done: the same numbers
within float rounding, without running calibration through the packed kernels.
Peak memory: the model plus one block's activations for the calibration windows.
Methods that need no statistics (RTN) skip the forward passes entirely.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from advisor.models.data import Windows
from advisor.models.errors import AdvisorError

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside a hook once the needed input has been captured."""


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits_per_weight: float
    rel_error: float | None  # ||(W - W_hat) X||^2 / ||W X||^2 on calibration inputs (None without H)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "bits_per_weight": self.bits_per_weight,
                "rel_error": self.rel_error, "info": self.info}


@dataclass
class QuantizeResult:
    spec: str
    bits_per_weight: float  # parameter-weighted over the quantized linear layers
    n_layers: int
    n_quantized_params: int
    seconds: float
    packed: bool
    layers: list[LayerReport]
    calibration: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "bits_per_weight": self.bits_per_weight, "n_layers": self.n_layers,
                "n_quantized_params": self.n_quantized_params, "seconds": self.seconds, "packed": self.packed,
                "calibration": self.calibration, "layers": [r.to_dict() for r in self.layers]}


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, calib: Windows,
                         device: torch.device) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Hidden states entering block 0 for each calibration window, plus the block's keyword arguments.

    Windows run one at a time (batch 1), so the captured kwargs (masks, rotary embeddings) fit each.
    """
    inputs: list[torch.Tensor] = []
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
            captured["_n_args"] = len(args)
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in calib.ids:
            try:
                model(input_ids=ids[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    captured.pop("_n_args", None)
    captured.pop("past_key_values", None)
    captured.pop("past_key_value", None)
    captured["use_cache"] = False
    return inputs, captured


def _run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [_first(block(x, **kwargs)) for x in inputs]


class _StatsCollector:
    """Accumulates H = sum x x^T and mean |x| of one layer input over calibration tokens (float32)."""

    def __init__(self, need_h: bool, need_abs: bool):
        self.need_h, self.need_abs = need_h, need_abs
        self.H: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.need_h:
            self.H = x.T @ x if self.H is None else self.H.addmm_(x.T, x)
        if self.need_abs:
            s = x.abs().sum(0)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n += x.shape[0]


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


def quantize_model(loaded, spec, calib: Windows | None, *, pack: bool = True, progress: bool = True,
                   skip_layers: tuple[str, ...] = ()) -> QuantizeResult:
    """Quantize every linear layer of the model's blocks in place, block by block.

    Args:
        loaded: a :class:`models.loading.LoadedModel`.
        spec: a ``QuantSpec`` or spec string (``"gptq:int4:g128"``).
        calib: calibration windows; may be None only for methods that need no statistics.
        pack: replace layers by packed ``kernels.QuantLinear`` modules (what a user deploys); else write
            dequantized weights into the existing ``nn.Linear`` layers.
        progress: tqdm bar over blocks and layers.
        skip_layers: full layer names to leave in full precision.
    Returns:
        per-layer reports, overall bits per weight, seconds.
    Raises:
        AdvisorError: missing calibration data; ValueError (with the layer name) for NaN/Inf.
    """
    from tqdm.auto import tqdm

    from advisor.quantizers import LayerStats, QuantSpec, get_method

    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    method = get_method(spec.method)
    need_h = "hessian" in method.requires
    need_abs = "act_abs_mean" in method.requires
    need_stats = need_h or need_abs
    if need_stats and (calib is None or len(calib) == 0):
        raise AdvisorError(f"method {spec.method} needs calibration data (--calib); none was given")

    t0 = time.perf_counter()
    model, adapter = loaded.model, loaded.adapter
    device = next(model.parameters()).device
    _check_memory(loaded, spec, calib if need_stats else None, need_h, need_abs, device)
    blocks = adapter.blocks()
    prefix = adapter.blocks_prefix()
    reports: list[LayerReport] = []
    n_layers_total = sum(adapter.n_linear_per_block())
    bar = tqdm(total=n_layers_total, desc=f"quantize {spec}", unit="layer", disable=not progress, leave=False)

    inputs: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}
    if need_stats:
        inputs, kwargs = capture_block_inputs(model, blocks[0], calib, device)

    pending: list = []  # packed layers wait for the end of their block (see _quantize_layer)
    try:
        for bi, block in enumerate(blocks):
            for group in adapter.linear_groups(block):
                stats = LayerStats()
                if need_stats:
                    collector = _StatsCollector(need_h, need_abs)

                    def hook(module, args, c=collector):
                        c.add(args[0])
                        raise _StopForward

                    handle = group[0][1].register_forward_pre_hook(hook)
                    try:
                        with torch.no_grad():
                            for x in inputs:
                                try:
                                    block(x, **kwargs)
                                except _StopForward:
                                    pass
                    finally:
                        handle.remove()
                    stats = LayerStats(H=collector.H, n_tokens=collector.n,
                                       act_abs_mean=None if collector.abs_sum is None else collector.abs_sum / collector.n)
                group_method, group_spec = method, spec
                if need_stats and stats.n_tokens == 0:
                    # no calibration token reached these layers (MoE experts the router never chose): there
                    # is nothing to fit, so they are rounded to nearest, and the report says so
                    group_method, group_spec = _unreached_fallback(spec)
                    stats = LayerStats()
                for path, layer in group:
                    full = f"{prefix}.{bi}.{path}"
                    bar.set_postfix_str(f"block {bi} {path}")
                    if full in skip_layers:
                        bar.update(1)
                        continue
                    report = _quantize_layer(block, path, full, layer, group_method, group_spec, stats, pack,
                                             pending if pack and need_stats else None)
                    if group_method is not method:
                        report.info["unreached"] = "no calibration tokens reached this layer: rounded to nearest"
                    reports.append(report)
                    bar.update(1)
            if need_stats and bi + 1 < len(blocks):
                with torch.no_grad():
                    inputs = _run_block(block, inputs, kwargs)
            for path, qw, layer in pending:  # the block's statistics passes ran on dense dequantized weights
                _pack_into(block, path, qw, layer)
            pending.clear()
    finally:
        bar.close()

    n_params = sum(r.shape[0] * r.shape[1] for r in reports)
    bpw = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in reports) / max(n_params, 1)
    return QuantizeResult(spec=str(spec), bits_per_weight=bpw, n_layers=len(reports), n_quantized_params=n_params,
                          seconds=time.perf_counter() - t0, packed=pack,
                          calibration=dict(calib.protocol) if calib is not None and need_stats else {},
                          layers=reports)


def _unreached_fallback(spec):
    from advisor.quantizers import QuantSpec, get_method

    return get_method("rtn"), QuantSpec("rtn", spec.dtype, spec.group_size, spec.symmetric)


def _check_memory(loaded, spec, calib, need_h: bool, need_abs: bool, device: torch.device) -> None:
    """Refuse before any work when the run's working memory cannot fit (CPU: MemAvailable)."""
    if device.type != "cpu":
        return  # GPU memory is the user's allocator's business; torch raises a clear OOM there
    from advisor.models.memory import check_quantization_fits, quantization_working_bytes

    shapes = [(layer.out_features, layer.in_features) for _, layer in loaded.adapter.linear_layers()]
    hidden = getattr(loaded.model.config, "hidden_size", None) or getattr(loaded.model.config, "n_embd", 0)
    n, seq = (calib.ids.shape[0], calib.ids.shape[1]) if calib is not None else (0, 0)
    work = quantization_working_bytes(shapes, int(hidden), n, seq, need_h, need_abs)
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    check_quantization_fits(model_bytes, work, f"quantizing with {spec}")


def _dense_stand_in(layer: nn.Module, W_hat: torch.Tensor) -> nn.Module:
    """A shallow copy of ``layer`` (same class, bias and hooks) whose weight is ``W_hat``; ``layer`` is untouched."""
    stand_in = copy.copy(layer)
    stand_in._parameters = dict(layer._parameters)
    stand_in.weight = nn.Parameter(W_hat.to(device=layer.weight.device, dtype=layer.weight.dtype), requires_grad=False)
    return stand_in


def _pack_into(block: nn.Module, path: str, qw, layer: nn.Linear) -> None:
    qlinear = qw.pack(bias=None if layer.bias is None else layer.bias.data.float())
    qlinear.to(layer.weight.device)
    set_module(block, path, qlinear)


def _quantize_layer(block: nn.Module, path: str, full: str, layer: nn.Linear, method, spec, stats,
                    pack: bool, pending: list | None = None) -> LayerReport:
    """Quantize one layer. ``pack`` swaps in the packed module at once, unless ``pending`` is given: then the
    dequantized weights are written in place and ``(path, qw, layer)`` is appended for packing later."""
    W = layer.weight.data
    qw = method.quantize(W.float(), spec, stats, name=full)
    W_hat = qw.dequantize().to(W.device)
    rel = None
    if stats.H is not None:
        from advisor.quantizers import layer_error

        base = layer_error(W.float(), torch.zeros_like(W, dtype=torch.float32), stats.H)
        rel = layer_error(W.float(), W_hat, stats.H) / base if base > 0 else 0.0
    if pack and pending is None:
        _pack_into(block, path, qw, layer)
    elif pending is not None:
        # the block's later statistics passes run on the quantized weights, through a stand-in: the
        # caller's layer object keeps its weights (recommend puts it back after an attempt)
        set_module(block, path, _dense_stand_in(layer, W_hat))
        pending.append((path, qw, layer))
    else:
        with torch.no_grad():
            layer.weight.copy_(W_hat.to(W.dtype))
    info = {k: v for k, v in qw.info.items() if isinstance(v, (int, float, str, bool))}
    return LayerReport(name=full, shape=tuple(W.shape), bits_per_weight=spec.bits_per_weight(W.shape[1]),
                       rel_error=rel, info=info)
