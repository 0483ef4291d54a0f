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

Memory: the probe keeps no model-sized tensor. All windows go through one forward/backward pass
(``batch_size`` >= windows, the default), the head runs on chunks of tokens (no ``(tokens, vocab)``
float32 logits, ``_util.chunked_nll_backward``), and each layer's per-window gradients are folded
into that layer's statistics (trace, max, mean-gradient norm) and into the rows ``second_order``
samples as soon as its output gradient exists; only one layer's ``(out, in)`` accumulators live at
a time. With fewer windows per pass than windows, the diagonal is accumulated over passes first
(two float32 copies of the linear weights). The sampled rows of the diagonal and of the mean
gradient stay in the run's ``ProbeContext`` (``cache["fisher.rows"]``) for ``second_order``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from advisor.probes._util import (chunk_tokens, chunked_nll_backward, chunked_nll_from_hidden, device_of, first_windows,
                                  grad_only, layer_infos, preserved_state, split_head, token_nll)
from advisor.probes._rtn import layer_rows
from advisor.probes.base import Probe, ProbeContext, ProbeResult, get_probe, register


def sample_targets(logits_rows: Callable[[int, int], torch.Tensor], n_rows: int, step: int,
                   gen: torch.Generator) -> torch.Tensor:
    """Next tokens drawn from ``softmax(logits_rows(i, j))`` chunk by chunk (``step`` rows), CPU generator.

    The fast path and the reference draw through this one function with the same chunking, so they
    draw the same tokens."""
    out = []
    for i in range(0, n_rows, step):
        probs = torch.softmax(logits_rows(i, min(i + step, n_rows)).detach().float(), -1).cpu()
        out.append(torch.multinomial(probs, 1, generator=gen).view(-1))
    return torch.cat(out)


def fisher_diagonal_reference(model, params: list[torch.Tensor], ids: torch.Tensor, labels: str = "empirical",
                              seed: int = 0) -> tuple[list[torch.Tensor], float, list[torch.Tensor]]:
    """The token-scaled Fisher diagonal ``F = n_pred * mean_w g_w^2`` (module docstring) and the mean gradient,
    one backward pass per window through the full logits (the slow, obviously correct reference of
    ``fisher_diagonal``).

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
                logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
                step = chunk_tokens(logits.shape[-1])
                targets = sample_targets(lambda i, j: logits[i:j], logits.shape[0], step, gen)
                targets = targets.view(1, -1).to(window.device)
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


def _output_gradients(model, split, batch: torch.Tensor, outputs_of: Callable[[], list[torch.Tensor]], labels: str,
                      gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``d(sum of window-mean NLLs)/d(layer outputs)`` of one batch and the empirical per-window NLL.

    Through the head in chunks when the model can be cut (``split``, from ``_util.split_head``), else the
    full logits.
    ``outputs_of`` returns the layer outputs recorded by the forward pass (call after it)."""
    b, n_pred = batch.shape[0], batch.shape[1] - 1
    real = batch[:, 1:].reshape(-1)
    if split is None:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        flat = logits.reshape(-1, logits.shape[-1])
        targets = real
        if labels == "sampled":  # window by window: the same draws as the reference
            step = chunk_tokens(flat.shape[-1])
            targets = torch.cat([sample_targets(lambda i, j, w=w: flat[w * n_pred + i : w * n_pred + j], n_pred,
                                                step, gen) for w in range(b)]).to(batch.device)
        nll = F.cross_entropy(flat, targets, reduction="none").view(b, -1).mean(1)
        deltas = torch.autograd.grad(nll.sum(), outputs_of())
        with torch.no_grad():
            if labels == "sampled":
                nll = F.cross_entropy(flat, real, reduction="none").view(b, -1).mean(1)
        return deltas, nll.detach()
    h = split.hidden(batch)[:, :-1]
    flat = h.reshape(-1, h.shape[-1])
    targets = real
    if labels == "sampled":
        step = chunk_tokens(split.head.weight.shape[0])
        with torch.no_grad():
            targets = torch.cat([sample_targets(lambda i, j, w=w: split.logits(flat[w * n_pred + i : w * n_pred + j]),
                                                n_pred, step, gen) for w in range(b)]).to(batch.device)
    weights = torch.full((flat.shape[0],), 1.0 / n_pred, device=flat.device)
    grad_h, tok = chunked_nll_backward(split, flat, targets, weights)
    deltas = torch.autograd.grad(flat, outputs_of(), grad_outputs=grad_h)
    if labels == "sampled":
        tok = chunked_nll_from_hidden(split, flat.detach(), real)
    return deltas, tok.view(b, -1).mean(1)


def fisher_diagonal(model, layers: list[nn.Linear], ids: torch.Tensor, labels: str = "empirical", seed: int = 0,
                    batch_size: int = 8, fold: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
                    ) -> tuple[list[torch.Tensor] | None, float, list[torch.Tensor] | None]:
    """``fisher_diagonal_reference`` for the weights of ``layers`` with one backward pass per batch of windows.

    Per-window weight gradients of a linear layer ``y = x W^T`` are ``G_w = sum_t delta_wt x_wt^T`` with
    ``delta = dLoss/dy``: windows in a batch do not interact, so the gradient of the batch's summed loss
    w.r.t. window w's outputs is that window's own. The backward pass only computes ``delta`` for
    every layer output (no weight gradients); one matrix product per window and layer gives ``G_w``.

    Args:
        layers: linear modules whose weights require grad (so their outputs are in the graph); each is
            called once per forward pass.
        batch_size: windows per forward/backward pass (memory: activations, one layer's (out, in)).
        fold: when given, called as ``fold(i, F_i, mean_i)`` once per layer with that layer's finished
            diagonal and mean gradient, which are then dropped (the bounded-memory path); the function
            then returns None for both lists.
    Returns:
        (F per weight, mean empirical NLL over windows, mean_w G_w per weight)
    """
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"fisher labels must be 'empirical' or 'sampled', got {labels!r}")
    gen = torch.Generator().manual_seed(seed)
    n_windows, n_pred = ids.shape[0], ids.shape[1] - 1
    batch_size = max(1, int(batch_size))
    one_pass = fold is not None and n_windows <= batch_size
    sq = None if one_pass else [torch.zeros_like(m.weight, dtype=torch.float32) for m in layers]
    mean = None if one_pass else [torch.zeros_like(m.weight, dtype=torch.float32) for m in layers]
    total_nll = 0.0
    split = split_head(model, ids)  # before the hooks: its check runs a forward pass
    for start in range(0, n_windows, batch_size):
        batch = ids[start : start + batch_size]
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(module, args, out, i):
            if i in seen:
                raise RuntimeError(f"linear layer {i} ran twice in one forward pass; use fisher_diagonal_reference")
            seen[i] = (args[0].detach(), out)

        handles = [m.register_forward_hook(functools.partial(keep, i=i)) for i, m in enumerate(layers)]
        try:
            deltas, nll = _output_gradients(model, split, batch, lambda: [seen[i][1] for i in range(len(layers))],
                                            labels, gen)
        finally:
            for h in handles:
                h.remove()
        deltas = list(deltas)
        with torch.no_grad():
            for i in range(len(layers)):
                d, x = deltas[i], seen[i][0]
                d = d.reshape(d.shape[0], -1, d.shape[-1]).float()
                x = x.reshape(x.shape[0], -1, x.shape[-1]).float()
                s_i = sq[i] if sq is not None else torch.zeros_like(layers[i].weight, dtype=torch.float32)
                m_i = mean[i] if mean is not None else torch.zeros_like(layers[i].weight, dtype=torch.float32)
                for w in range(d.shape[0]):
                    G = d[w].T @ x[w]  # (out, in)
                    s_i.addcmul_(G, G)
                    m_i.add_(G, alpha=1.0 / n_windows)
                del G
                deltas[i] = None
                seen[i] = (None, None)
                if one_pass:
                    fold(i, s_i.mul_(n_pred / n_windows), m_i)
                del s_i, m_i
            total_nll += float(nll.sum())
        del seen, deltas
    if one_pass:
        return None, total_nll / n_windows, None
    for s in sq:
        s.mul_(n_pred / n_windows)
    if fold is not None:
        for i in range(len(layers)):
            fold(i, sq[i], mean[i])
        return None, total_nll / n_windows, None
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
        rows_key = second_order_rows_key(context, seed)
        sample = layer_rows(layers, *rows_key)
        rows: list[dict | None] = [None] * len(layers)
        diag_rows: dict[str, torch.Tensor] = {}
        grad_rows: dict[str, torch.Tensor] = {}

        def fold(i: int, f: torch.Tensor, m: torch.Tensor) -> None:
            li, r = layers[i], sample[i].to(f.device)
            tr = float(f.double().sum())
            top = float(f.max())
            rows[i] = {"layer": li.name, "block": li.block, "kind": li.kind, "role": li.role,
                       "n_params": li.n_params, "trace": tr, "trace_per_param": tr / li.n_params,
                       "max": top, "max_over_mean": top / (tr / li.n_params) if tr > 0 else 0.0,
                       "mean_grad_sq_norm": float(m.double().pow(2).sum())}
            diag_rows[li.name] = f[r].cpu().clone()
            grad_rows[li.name] = m[r].cpu().clone()

        with preserved_state(model), torch.enable_grad():
            grad_only(model, params)
            _, nll, _ = fisher_diagonal(model, [li.module for li in layers], ids, settings["labels"], seed,
                                        int(settings["batch_size"]), fold=fold)
        context.cache["fisher.rows"] = {"key": rows_key, "diag": diag_rows, "mean_grad": grad_rows}
        context.cache["fisher.settings"] = dict(settings)
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


def second_order_rows_key(context: ProbeContext, seed: int) -> tuple[int | None, int, int]:
    """(max_elements, min_rows, seed) of the rows ``second_order`` samples with the run's settings."""
    so = get_probe("second_order").resolve_settings(context.settings.get("second_order"))
    return so["max_elements"], int(so["min_rows"]), seed


def ensure_fisher(loaded, calib, seed: int, context: ProbeContext) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The Fisher diagonal and mean gradient at the rows ``second_order`` samples (layer name -> (rows, in)),
    computing them with the run's ``fisher`` settings when the run has not (or for other rows)."""
    held = context.cache.get("fisher.rows")
    if held is None or held["key"] != second_order_rows_key(context, seed):
        get_probe("fisher").run(loaded, calib, seed=seed, settings=context.settings.get("fisher"), context=context)
        held = context.cache["fisher.rows"]
    return held["diag"], held["mean_grad"]


register(FisherProbe())
