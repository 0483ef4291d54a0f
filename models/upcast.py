"""16-bit weights, float32 products: how a bf16 model runs on a CPU without bf16 arithmetic.

A 7B model fits a 24 GB machine only with 16-bit weights, and on a CPU without AVX512-BF16, AMX or ARM's
BF16, torch's bf16 matrix product is emulated: 4-6x slower than float32 (1.8 against 11.4 GFLOP/s on one
Zen 1 core, ``docs/experiments.md``). :func:`float32_products` makes every ``nn.Linear`` of such a model
compute ``F.linear`` in float32 from its 16-bit weight, converted for the duration of the call: the
weights stay 16-bit in memory (one layer's float32 copy exists at a time, during its own product), and
the output is rounded back to the input's dtype, as torch's own bf16 product (float32 accumulation)
rounds it, so the rest of the model (norms, attention, masks) sees the dtypes it was built for.

The backward pass converts the weight again rather than keeping the float32 copy (autograd would
otherwise hold one per layer until the backward: a float32 model). Weight gradients, where asked for,
are float32 products rounded to the weight's dtype.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

HALF = (torch.bfloat16, torch.float16)


class _Float32Linear(torch.autograd.Function):
    """``F.linear(x, W, b)`` with float32 products from 16-bit ``W``; saves ``W`` itself, not a copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return gx, gw, gb


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.dtype not in HALF:  # a layer later replaced by float32 weights computes as it is
        return F.linear(x, self.weight, self.bias)
    return _Float32Linear.apply(x, self.weight, self.bias)


def needs_float32_products(device: torch.device, dtype: torch.dtype) -> bool:
    """16-bit weights on a CPU that has no bf16 arithmetic (``models.loading.cpu_has_bf16``)."""
    from advisor.models.loading import cpu_has_bf16

    return torch.device(device).type == "cpu" and dtype in HALF and not cpu_has_bf16()


def float32_products(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` compute in float32 from its 16-bit weight (module
    docstring). Idempotent; returns the number of layers that now do."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            if getattr(module.forward, "__func__", None) is not _forward:
                module.forward = types.MethodType(_forward, module)
            n += 1
    return n
