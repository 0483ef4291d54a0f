"""``fisher``: the diagonal Fisher of the mean-token NLL w.r.t. every linear weight.

Estimator: one gradient per calibration window, ``g_w = d(mean NLL of window w)/dW``, and

    F_ii = n_pred * mean_w (g_w,i)^2          n_pred = seq_len - 1 predicted tokens per window.

Why the factor ``n_pred``: the Fisher of the mean-token NLL is the per-token second moment
``E_t[(d l_t / dW_i)^2]``; a window gradient is the mean of ``n_pred`` token gradients, whose
second moment is ``1/n_pred`` of the per-token one when token gradients are uncorrelated and
zero-mean. With ``labels="sampled"`` the targets are drawn from the model's own predictive
distribution (inputs stay the real text), which makes token gradients exactly zero-mean and
uncorrelated given the inputs, so the scaled estimator is unbiased for the true Fisher (= the
Gauss-Newton diagonal); with ``labels="empirical"`` (default, the brief's "empirical Fisher") the
real next tokens are the targets. Then ``dL ~ 1/2 sum_i F_ii e_i^2`` (``second_order``).

The full diagonal stays in the run's ``ProbeContext`` (``cache["fisher.diag"]``) for ``second_order``.
"""
from __future__ import annotations

import functools
import math

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from advisor.probes._util import device_of, first_windows, grad_only, layer_infos, preserved_state, token_nll
from advisor.probes.base import Probe, ProbeContext, ProbeResult, get_probe, register


def fisher_diagonal_reference(model, params: list[torch.Tensor], ids: torch.Tensor, labels: str = "empirical",
                              seed: int = 0) -> tuple[list[torch.Tensor], float, list[torch.Tensor]]:
    """The token-scaled Fisher diagonal ``F = n_pred * mean_w g_w^2`` (module docstring) and the mean gradient,
    one backward pass per window (the slow, obviously correct reference of ``fisher_diagonal``).

    Args:
        model: returns ``.logits`` (batch, seq_len, vocab) for ``model(input_ids=..., use_cache=False)``.
        params: tensors requiring grad.
        ids: (n_windows, seq_len) token ids on the model's device.
        labels: ``"empirical"`` (real next tokens) or ``"sampled"`` (drawn from the model).
    Returns:
        (F per param (same shapes, float32), mean NLL over windows, mean_w g_w per param)
    """
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"fisher labels must be 'empirical' or 'sampled', got {labels!r}")
    gen = torch.Generator().manual_seed(seed)
    sq = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    mean = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    total_nll = 0.0
    for w in range(ids.shape[0]):
        window = ids[w : w + 1]
        targets = None
        if labels == "sampled":
            with torch.no_grad():
                logits = model(input_ids=window, use_cache=False).logits[:, :-1].float()
                probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), -1).cpu()
                targets = torch.multinomial(probs, 1, generator=gen).view(1, -1).to(window.device)
        loss = token_nll(model, window, targets).sum()
        grads = torch.autograd.grad(loss, params)
        for s, m, g in zip(sq, mean, grads):
            s.add_(g.float().pow(2))
            m.add_(g.float(), alpha=1.0 / ids.shape[0])
        total_nll += float(loss.detach()) if labels == "empirical" else float(token_nll(model, window).detach().sum())
    n_pred = ids.shape[1] - 1
    for s in sq:
        s.mul_(n_pred / ids.shape[0])
    return sq, total_nll / ids.shape[0], mean


def _sample_targets(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Next tokens drawn from softmax(logits) (1, T, vocab) -> (1, T) long, with a CPU generator."""
    probs = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]).float(), -1).cpu()
    return torch.multinomial(probs, 1, generator=gen).view(1, -1).to(logits.device)


def fisher_diagonal(model, layers: list[nn.Linear], ids: torch.Tensor, labels: str = "empirical", seed: int = 0,
                    batch_size: int = 8) -> tuple[list[torch.Tensor], float, list[torch.Tensor]]:
    """``fisher_diagonal_reference`` for the weights of ``layers`` with one backward pass per batch of windows.

    Per-window weight gradients of a linear layer ``y = x W^T`` are ``G_w = sum_t delta_wt x_wt^T`` with
    ``delta = dLoss/dy``: windows in a batch do not interact, so the gradient of the batch's summed loss
    w.r.t. window w's outputs is that window's own. The backward pass only computes ``delta`` for
    every layer output (no weight gradients); one ``bmm`` per layer gives all ``G_w``.

    Args:
        layers: linear modules whose weights require grad (so their outputs are in the graph); each is
            called once per forward pass.
        batch_size: windows per forward/backward pass (memory: activations and (batch, out, in) per layer).
    Returns:
        (F per weight, mean empirical NLL over windows, mean_w G_w per weight)
    """
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"fisher labels must be 'empirical' or 'sampled', got {labels!r}")
    gen = torch.Generator().manual_seed(seed)
    n_windows, n_pred = ids.shape[0], ids.shape[1] - 1
    sq = [torch.zeros_like(m.weight, dtype=torch.float32) for m in layers]
    mean = [torch.zeros_like(m.weight, dtype=torch.float32) for m in layers]
    total_nll = 0.0
    for start in range(0, n_windows, max(1, int(batch_size))):
        batch = ids[start : start + batch_size]
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(module, args, out, i):
            if i in seen:
                raise RuntimeError(f"linear layer {i} ran twice in one forward pass; use fisher_diagonal_reference")
            seen[i] = (args[0].detach(), out)

        handles = [m.register_forward_hook(functools.partial(keep, i=i)) for i, m in enumerate(layers)]
        try:
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (b, T-1, vocab)
        finally:
            for h in handles:
                h.remove()
        flat = logits.reshape(-1, logits.shape[-1])
        real = batch[:, 1:]
        if labels == "sampled":  # window by window: the same draws as the reference
            targets = torch.cat([_sample_targets(logits[w : w + 1], gen) for w in range(batch.shape[0])])
        else:
            targets = real
        nll = F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(batch.shape[0], -1).mean(1)
        outputs = [seen[i][1] for i in range(len(layers))]
        deltas = torch.autograd.grad(nll.sum(), outputs)
        with torch.no_grad():
            for i, d in enumerate(deltas):
                x = seen[i][0]
                G = torch.bmm(d.reshape(d.shape[0], -1, d.shape[-1]).transpose(1, 2).float(),
                              x.reshape(x.shape[0], -1, x.shape[-1]).float())  # (b, out, in)
                sq[i].add_(G.pow(2).sum(0))
                mean[i].add_(G.sum(0), alpha=1.0 / n_windows)
            if labels == "sampled":
                nll = F.cross_entropy(flat, real.reshape(-1), reduction="none").view(batch.shape[0], -1).mean(1)
            total_nll += float(nll.sum())
        del seen, outputs, deltas, logits
    for s in sq:
        s.mul_(n_pred / n_windows)
    return sq, total_nll / n_windows, mean


class FisherProbe(Probe):
    name = "fisher"
    description = "empirical Fisher diagonal (token-scaled mean squared window gradients) per weight; layer/model summaries"
    version = "1"
    defaults = {
        "n_windows": None,  # None = every calibration window
        "labels": "empirical",  # or "sampled" (true Fisher by Monte Carlo labels)
        "batch_size": 8,  # windows per forward/backward pass
    }

    def _run(self, loaded, calib, *, seed, settings, context: ProbeContext) -> ProbeResult:
        layers = layer_infos(loaded)
        model = loaded.model
        ids = first_windows(calib, settings["n_windows"]).to(device_of(model))
        n_windows, n_pred = ids.shape[0], ids.shape[1] - 1
        params = [li.module.weight for li in layers]
        with preserved_state(model), torch.enable_grad():
            grad_only(model, params)
            sq, nll, mean = fisher_diagonal(model, [li.module for li in layers], ids, settings["labels"], seed,
                                            int(settings["batch_size"]))
        diag = {li.name: f for li, f in zip(layers, sq)}
        context.cache["fisher.diag"] = diag
        context.cache["fisher.mean_grad"] = {li.name: m for li, m in zip(layers, mean)}
        context.cache["fisher.settings"] = dict(settings)
        rows = []
        for li, m in zip(layers, mean):
            f = diag[li.name]
            tr = float(f.double().sum())
            rows.append({"layer": li.name, "block": li.block, "kind": li.kind, "role": li.role,
                         "n_params": li.n_params, "trace": tr, "trace_per_param": tr / li.n_params,
                         "max": float(f.max()), "max_over_mean": float(f.max()) / (tr / li.n_params) if tr > 0 else 0.0,
                         "mean_grad_sq_norm": float(m.double().pow(2).sum())})
        frame = pd.DataFrame(rows)
        total = float(frame["trace"].sum())
        n_params = int(frame["n_params"].sum())
        kinds = frame.groupby("kind")[["trace", "n_params"]].sum()
        per_param = frame["trace_per_param"].clip(lower=1e-30)
        features = {
            "trace": total,
            "trace_per_param": total / n_params,
            "log10_trace_per_param": math.log10(total / n_params) if total > 0 else -30.0,
            "attn_trace_share": float(kinds["trace"].get("attn", 0.0)) / total if total else 0.0,
            "attn_over_mlp_per_param": _ratio(kinds, "attn", "mlp"),
            "layer_log10_per_param_std": float(per_param.apply(math.log10).std(ddof=0)),
            "max_over_mean": float(frame["max"].max()) / (total / n_params) if total > 0 else 0.0,
            "grad_norm": math.sqrt(float(frame["mean_grad_sq_norm"].sum())),
            "loss": nll,
        }
        info = {"n_windows": n_windows, "n_tokens": int(ids.numel()), "scale": f"n_pred/n_windows = {n_pred}/{n_windows}",
                "estimator": "F = n_pred * mean over windows of squared window-mean-NLL gradients"}
        return ProbeResult(self.name, features, frame, settings, info=info)


def _ratio(kinds: pd.DataFrame, a: str, b: str) -> float:
    if a not in kinds.index or b not in kinds.index:
        return 1.0
    pa = kinds.loc[a, "trace"] / kinds.loc[a, "n_params"]
    pb = kinds.loc[b, "trace"] / kinds.loc[b, "n_params"]
    return float(pa / pb) if pb > 0 else 0.0


def ensure_fisher(loaded, calib, seed: int, context: ProbeContext) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The run's Fisher diagonal and mean gradient (layer name -> (out, in)), computing them with the run's
    ``fisher`` settings when absent."""
    if "fisher.diag" not in context.cache:
        get_probe("fisher").run(loaded, calib, seed=seed, settings=context.settings.get("fisher"), context=context)
    return context.cache["fisher.diag"], context.cache["fisher.mean_grad"]


register(FisherProbe())
