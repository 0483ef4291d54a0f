"""``hessian``: trace and top eigenvalue of the loss Hessian w.r.t. the linear weights.

Loss: the mean token NLL over the first ``n_windows`` calibration windows. Hessian-vector products
by double backward (Pearlmutter): ``Hv = d/dW <dL/dW, v>``; the attention is switched to an
implementation that supports double backward for the duration (see ``_util.double_backward_attention``).

- Trace by Hutchinson's estimator: ``tr(H) = E[v^T H v]`` for Rademacher ``v``; per layer from the
  layer's slice of the same probe vectors, with the standard error over probes.
- Top eigenvalue (largest in magnitude) by power iteration on the whole linear-weight vector, started
  from ``H v`` of the last Rademacher probe (so ``power_iters`` HVPs make ``power_iters + 1`` power
  steps); the last Rayleigh quotient is reported (a few iterations: good to the order of magnitude).
- Cheap proxy per layer: ``tr(X^T X) / n_tokens`` = mean squared norm of the layer's input, the trace
  of the layer-wise reconstruction Hessian (GPTQ's H) per token, from the same forward pass.
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from advisor.probes._util import (double_backward_attention, first_windows, grad_only, input_hooks, layer_infos,
                          preserved_state, select_layers, token_nll, device_of)
from advisor.probes.base import Probe, ProbeContext, ProbeResult, register


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _rademacher(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Independent +-1 entries, float32: 8 signs per random byte (a third of the cost of one draw each)."""
    n = math.prod(shape)
    raw = torch.randint(0, 256, ((n + 7) // 8,), generator=gen, dtype=torch.uint8)
    bits = (raw.unsqueeze(1) >> _SHIFTS).bitwise_and_(1)  # (ceil(n/8), 8)
    return bits.view(-1)[:n].view(shape).to(torch.float32).mul_(2).sub_(1)


def hutchinson(loss_fn, params: list[torch.Tensor], n_probes: int, power_iters: int, seed: int,
               probe_batch: int = 1):
    """Hutchinson samples and power iteration for the Hessian of ``loss_fn()`` w.r.t. ``params``.

    Args:
        loss_fn: zero-argument callable returning the scalar loss (run once, with a retained graph).
        params: tensors requiring grad.
        n_probes: Rademacher probe vectors.
        power_iters: power-iteration steps (0 to skip).
        probe_batch: probe vectors per autograd call (vectorized with ``is_grads_batched``; more
            memory, fewer passes: for small models). The draws do not depend on it.
    Returns:
        (samples (n_probes, len(params)) float64 of v_l^T (H v)_l per parameter tensor,
         top eigenvalue estimate (float, NaN when power_iters == 0), loss value)
    """
    gen = torch.Generator().manual_seed(seed)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    samples = torch.zeros(n_probes, len(params), dtype=torch.float64)
    probe_batch = max(1, int(probe_batch))
    n_calls = -(-n_probes // probe_batch) + power_iters
    done = 0

    def hvp(vs: list[torch.Tensor], batched: bool = False) -> tuple[torch.Tensor, ...]:
        nonlocal done
        done += 1
        return torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=done < n_calls,
                                   is_grads_batched=batched)

    last: list[torch.Tensor] = []
    for start in range(0, n_probes, probe_batch):
        b = min(probe_batch, n_probes - start)
        draws = [[_rademacher(p.shape, gen) for p in params] for _ in range(b)]  # probe-major order
        if b == 1:
            vs = [v.to(p.device) for v, p in zip(draws[0], params)]
            hvs = hvp(vs)
            samples[start] = torch.tensor([float((v * hv).sum()) for v, hv in zip(vs, hvs)], dtype=torch.float64)
            last = list(hvs)
        else:
            vs = [torch.stack([d[j] for d in draws]).to(p.device) for j, p in enumerate(params)]
            hvs = hvp(vs, batched=True)
            for j, (v, hv) in enumerate(zip(vs, hvs)):
                samples[start : start + b, j] = (v * hv).flatten(1).double().sum(1).cpu()
            last = [hv[-1] for hv in hvs]
    top = float("nan")
    if power_iters > 0:
        # start from H v of the last Rademacher probe: its first power step comes for free
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in last))
        vs = [v / norm for v in last] if norm > 0 else [torch.randn(p.shape, generator=gen).to(p.device) for p in params]
        for _ in range(power_iters):
            hvs = hvp(vs)
            top = sum(float((v * hv).sum()) for v, hv in zip(vs, hvs))
            norm = math.sqrt(sum(float(hv.pow(2).sum()) for hv in hvs))
            if norm == 0.0:
                break
            vs = [hv / norm for hv in hvs]
    return samples, top, float(loss.detach())


class HessianProbe(Probe):
    name = "hessian"
    description = "Hutchinson trace (per layer, total, std. error) and top eigenvalue of the loss Hessian; tr(X^T X) proxy"
    version = "1"
    defaults = {
        "n_windows": 1,  # calibration windows in the loss (the first ones)
        "seq_len": 64,  # tokens of each window used (None = whole window): an HVP costs ~10 forward passes
        "n_probes": 2,  # Rademacher vectors (>= 2 for a standard error)
        "power_iters": 1,  # HVPs of power iteration (started from the last probe's H v: 1 HVP = 2 power steps)
        "layers": None,  # regexes restricting the linear layers (None = all)
        "probe_batch": 1,  # probe vectors per vectorized HVP call (memory x this); >1 for small models
    }

    def _run(self, loaded, calib, *, seed, settings, context: ProbeContext) -> ProbeResult:
        n_probes = int(settings["n_probes"])
        if n_probes < 2:
            raise ValueError(f"hessian n_probes must be at least 2 (for a standard error), got {n_probes}")
        layers = select_layers(layer_infos(loaded), settings["layers"])
        model = loaded.model
        ids = first_windows(calib, settings["n_windows"])
        if settings["seq_len"] is not None:
            ids = ids[:, : max(2, int(settings["seq_len"]))]
        ids = ids.to(device_of(model))
        params = [li.module.weight for li in layers]
        xtx = {li.name: 0.0 for li in layers}
        n_rows = {li.name: 0 for li in layers}

        def record(li, x):
            xtx[li.name] += float(x.double().pow(2).sum())
            n_rows[li.name] += x.shape[0]

        with preserved_state(model), double_backward_attention(model) as attn:
            grad_only(model, params)
            with input_hooks(layers, record):
                samples, top, loss = hutchinson(lambda: token_nll(model, ids).mean(), params, n_probes,
                                                int(settings["power_iters"]), seed,
                                                int(settings["probe_batch"]))
        trace = samples.mean(0)  # (layers,)
        se = samples.std(0, unbiased=True) / math.sqrt(n_probes)
        totals = samples.sum(1)
        total, total_se = float(totals.mean()), float(totals.std(unbiased=True)) / math.sqrt(n_probes)
        n_params = sum(li.n_params for li in layers)
        rows = []
        for i, li in enumerate(layers):
            rows.append({"layer": li.name, "block": li.block, "kind": li.kind, "role": li.role,
                         "n_params": li.n_params, "trace": float(trace[i]), "trace_se": float(se[i]),
                         "trace_per_param": float(trace[i]) / li.n_params,
                         "xtx_trace_per_token": xtx[li.name] / max(n_rows[li.name], 1)})
        frame = pd.DataFrame(rows)
        by_kind = frame.groupby("kind")["trace"].sum()
        proxy = float((frame["xtx_trace_per_token"] * [li.module.out_features for li in layers]).sum())
        features = {
            "trace": total,
            "trace_se": total_se,
            "trace_rel_se": total_se / abs(total) if total else 0.0,
            "trace_per_param": total / n_params,
            "top_eigenvalue": top,
            "top_eig_over_trace": top / total if total else 0.0,
            "attn_trace_share": float(by_kind.get("attn", 0.0)) / total if total else 0.0,
            "xtx_proxy": proxy,
            "log10_xtx_proxy": math.log10(proxy) if proxy > 0 else 0.0,
            "loss": loss,
        }
        info = {"n_tokens": int(ids.numel()), "attention": attn, "n_layers": len(layers),
                "estimator": "Hutchinson (Rademacher), double-backward HVP; power iteration (Gaussian start)"}
        return ProbeResult(self.name, features, frame, settings, info=info)


register(HessianProbe())
