"""The standard perplexity protocol (GPTQ / AWQ / QuantEase): mean token NLL over windows, exp; and the
divergence of a quantized model's next-token distributions from its baseline's (llama.cpp's set).

Each window is run independently (no carried context). A window of L tokens predicts L - 1 tokens;
every window has the same length, so the mean over all predicted tokens equals the mean of the
per-window means used by the GPTQ scripts.

KL statistics (``llama-perplexity --kl-divergence``'s set: mean, median, p99 and max of the per-token
KL(P_baseline || Q_quantized), the rate at which both put the same token on top, and the mean |dp| of
the correct token) come from the same pass as the perplexity. The baseline pass keeps, per predicted
token, the baseline's ``top_k`` largest log-probabilities with their ids and the correct token's
log-probability (:class:`Reference`; 20 windows x 511 tokens x k=128 is about 10 MB, where the full
distributions of a 49k vocabulary would take 2 GB). Each window's log-softmax is computed on its own,
so no tokens x vocabulary tensor of more than one batch ever exists. Per token,

    KL ~= sum_{i in topk(P)} p_i (log p_i - log q_i) + p_r (log p_r - log q_r),  p_r = 1 - sum p_i, q_r = 1 - sum q_i,

which is the exact KL between P and Q with the tokens outside the baseline's top k merged into one
outcome: never above the full KL (log-sum inequality) and equal to it once the tail mass is
negligible; ``top_k`` at the vocabulary size makes it exact (tests/test_evaluate.py checks both).
Standard errors are over windows (the per-window means), which accounts for the correlation of
tokens within a window; the paired standard error of dL uses the same windows for both models.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advisor.models.data import Windows
from advisor.models.errors import AdvisorError

DEFAULT_TOP_K = 128  # baseline log-probabilities kept per token for the KL statistics


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    nll: float  # mean token negative log-likelihood, nats
    n_tokens: int  # predicted tokens
    seconds: float
    protocol: dict[str, Any] = field(default_factory=dict)
    window_nll: tuple[float, ...] = ()  # per-window mean NLL (for paired comparisons)
    reference: "Reference | None" = None  # kept when asked (``top_k``): the baseline for KL statistics
    kld: "KLStats | None" = None  # against the ``reference`` given

    def to_dict(self) -> dict[str, Any]:
        d = {"ppl": self.ppl, "nll": self.nll, "n_tokens": self.n_tokens, "seconds": self.seconds,
             "protocol": self.protocol}
        if self.kld is not None:
            d["kld"] = self.kld.to_dict()
        return d


@dataclass
class Reference:
    """A baseline's next-token distributions on some windows, bounded: per predicted token its ``k``
    largest log-probabilities and their ids, and the log-probability of the correct token."""

    topk_logp: torch.Tensor  # (n_windows, seq_len - 1, k) float32
    topk_ids: torch.Tensor  # (n_windows, seq_len - 1, k) int64
    target_logp: torch.Tensor  # (n_windows, seq_len - 1) float32
    window_nll: tuple[float, ...] = ()

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[-1])


@dataclass(frozen=True)
class KLStats:
    """KL divergence of a model's next-token distributions from a reference's, over the same tokens."""

    mean: float
    median: float
    p99: float
    max: float
    same_top_rate: float  # fraction of tokens where both models' most likely token is the same
    mean_abs_dp: float  # mean |p_model(correct) - p_reference(correct)|
    se: float | None  # standard error of the mean, over windows (None with one window)
    n_tokens: int
    top_k: int
    window_kld: tuple[float, ...] = ()
    window_same_top: tuple[float, ...] = ()  # per-window same-top rate (standard errors over windows)
    window_abs_dp: tuple[float, ...] = ()  # per-window mean |dp|
    token_kld: "torch.Tensor | None" = field(default=None, repr=False, compare=False)  # (n_windows, seq_len - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "median": self.median, "p99": self.p99, "max": self.max,
                "same_top_rate": self.same_top_rate, "mean_abs_dp": self.mean_abs_dp, "se": self.se,
                "n_tokens": self.n_tokens, "top_k": self.top_k}


def paired_se(a: "list[float] | tuple[float, ...]", b: "list[float] | tuple[float, ...]") -> float | None:
    """Standard error of mean(a) - mean(b) over paired windows (None with fewer than two)."""
    n = min(len(a), len(b))
    if n < 2:
        return None
    d = torch.tensor(a[:n], dtype=torch.float64) - torch.tensor(b[:n], dtype=torch.float64)
    return float(d.std(unbiased=True) / math.sqrt(n))


def _kl_rows(logp_q: torch.Tensor, ref_logp: torch.Tensor, ref_ids: torch.Tensor) -> torch.Tensor:
    """Per-token top-k KL (module docstring) for log-probs ``logp_q`` (t, V) against the reference's
    top-k ``ref_logp``/``ref_ids`` (t, k)."""
    q_k = logp_q.gather(-1, ref_ids)
    p_k = ref_logp.exp()
    head = (p_k * (ref_logp - q_k)).sum(-1)
    p_r = (1 - p_k.sum(-1)).clamp_min(0)
    q_r = (1 - q_k.exp().sum(-1)).clamp_min(1e-30)
    tail = torch.where(p_r > 1e-12, p_r * (p_r.clamp_min(1e-30).log() - q_r.log()), torch.zeros_like(p_r))
    return (head + tail).clamp_min(0)


def window_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-window mean NLL of next-token prediction, float32 (batch,), for ids (batch, seq_len)."""
    logits = model(input_ids=ids, use_cache=False).logits  # (batch, seq_len, vocab)
    logits = logits[:, :-1].float()
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).mean(dim=1)


@torch.no_grad()
def perplexity(model: nn.Module, windows: Windows, batch_size: int = 1,
               device: str | torch.device | None = None, progress: bool = True,
               desc: str = "perplexity", top_k: int | None = None, reference: Reference | None = None,
               start: int = 0, stop: int | None = None) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` by the standard protocol.

    Args:
        model: a causal LM returning ``.logits``.
        windows: (n, seq_len) token ids and their protocol fingerprint.
        batch_size: windows per forward pass (does not change the result beyond float rounding).
        device: where to run (default: the model's device).
        progress: show a tqdm bar with ETA on stderr.
        top_k: keep this many of the model's log-probabilities per token (``result.reference``), to
            compare another model against this one later.
        reference: a baseline's :class:`Reference` on the same windows: the result carries KL statistics.
        start, stop: measure only windows ``start:stop`` (a sequential test's next stage).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise AdvisorError(f"--batch-size must be positive, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    per_window: list[float] = []
    stop = len(windows) if stop is None else min(stop, len(windows))
    n = stop - start
    if n < 1:
        raise AdvisorError(f"no windows to measure in {start}:{stop} of {len(windows)}")
    if reference is not None and reference.target_logp.shape[0] < stop:
        raise AdvisorError(f"the reference covers {reference.target_logp.shape[0]} windows, fewer than {stop}")
    kept: dict[str, list[torch.Tensor]] = {"logp": [], "ids": [], "target": []}
    kl_tok: list[torch.Tensor] = []
    same_top: list[torch.Tensor] = []
    abs_dp: list[torch.Tensor] = []
    with tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False) as bar:
        for i in range(start, stop, batch_size):
            batch = windows.ids[i : min(i + batch_size, stop)].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            targets = batch[:, 1:]
            b, t = targets.shape
            # one batch's log-softmax at a time: never a tokens x vocabulary tensor for all windows
            logp = torch.log_softmax(logits.float(), dim=-1)
            tgt = logp.gather(-1, targets[..., None])[..., 0]
            nll = -tgt.mean(dim=1)
            if not torch.isfinite(nll).all():
                raise AdvisorError(f"non-finite loss in windows {i}..{i + b - 1}: the model produces NaN/Inf "
                                   "(corrupted or badly quantized weights, or fp16 overflow: try --dtype float32)")
            if top_k is not None:
                v, ix = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                kept["logp"].append(v.cpu())
                kept["ids"].append(ix.cpu())
                kept["target"].append(tgt.cpu())
            if reference is not None:
                j = slice(i, i + b)
                r_logp, r_ids = reference.topk_logp[j].to(logp.device), reference.topk_ids[j].to(logp.device)
                kl_tok.append(_kl_rows(logp.reshape(b * t, -1), r_logp.reshape(b * t, -1),
                                       r_ids.reshape(b * t, -1)).view(b, t).cpu())
                same_top.append((logp.argmax(-1) == r_ids[..., 0]).cpu())
                abs_dp.append((tgt.exp() - reference.target_logp[j].to(tgt.device).exp()).abs().cpu())
            del logits, logp
            per_window.extend(nll.tolist())
            bar.update(b)
            bar.set_postfix(ppl=f"{math.exp(sum(per_window) / len(per_window)):.3f}")
    model.train(was_training)
    mean_nll = sum(per_window) / len(per_window)
    seq_len = windows.ids.shape[1]
    ref = None
    if top_k is not None:
        ref = Reference(torch.cat(kept["logp"]), torch.cat(kept["ids"]), torch.cat(kept["target"]), tuple(per_window))
    kld = None
    if reference is not None:
        top, dp = torch.cat(same_top).double(), torch.cat(abs_dp).double()
        kld = kl_stats(torch.cat(kl_tok), top.mean(dim=1).tolist(), dp.mean(dim=1).tolist(), reference.top_k)
    return EvalResult(ppl=math.exp(mean_nll), nll=mean_nll, n_tokens=n * (seq_len - 1),
                      seconds=time.perf_counter() - t0, protocol=dict(windows.protocol),
                      window_nll=tuple(per_window), reference=ref, kld=kld)


def kl_stats(token_kld: torch.Tensor, window_same_top: "list[float] | tuple[float, ...]",
             window_abs_dp: "list[float] | tuple[float, ...]", top_k: int) -> KLStats:
    """KL statistics from per-token divergences (n_windows, tokens) and per-window same-top rates and mean
    |dp| (every window predicts the same number of tokens, so window means average to token means)."""
    kl = token_kld.double()
    flat = kl.reshape(-1)
    per_w = kl.mean(dim=1)
    n = kl.shape[0]
    return KLStats(mean=float(flat.mean()), median=float(flat.median()), p99=float(torch.quantile(flat, 0.99)),
                   max=float(flat.max()), same_top_rate=float(sum(window_same_top) / n),
                   mean_abs_dp=float(sum(window_abs_dp) / n),
                   se=float(per_w.std(unbiased=True) / math.sqrt(n)) if n > 1 else None,
                   n_tokens=int(flat.numel()), top_k=top_k, window_kld=tuple(per_w.tolist()),
                   window_same_top=tuple(window_same_top), window_abs_dp=tuple(window_abs_dp), token_kld=kl.float())


def merge_kl(parts: "list[KLStats]") -> KLStats:
    """The KL statistics of consecutive stages' windows together (a sequential test's looks), as one pass
    over all of them would give."""
    return kl_stats(torch.cat([p.token_kld for p in parts]), [x for p in parts for x in p.window_same_top],
                    [x for p in parts for x in p.window_abs_dp], parts[0].top_k)


def extend_reference(a: Reference | None, b: Reference) -> Reference:
    """``a`` followed by ``b`` (the reference of the windows measured after ``a``'s)."""
    if a is None:
        return b
    return Reference(torch.cat([a.topk_logp, b.topk_logp]), torch.cat([a.topk_ids, b.topk_ids]),
                     torch.cat([a.target_logp, b.target_logp]), a.window_nll + b.window_nll)
