"""The standard perplexity protocol (GPTQ / AWQ / QuantEase): mean token NLL over windows, exp.

Each window is run independently (no carried context). A window of L tokens predicts L - 1 tokens;
every window has the same length, so the mean over all predicted tokens equals the mean of the
per-window means used by the GPTQ scripts.
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


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    nll: float  # mean token negative log-likelihood, nats
    n_tokens: int  # predicted tokens
    seconds: float
    protocol: dict[str, Any] = field(default_factory=dict)
    window_nll: tuple[float, ...] = ()  # per-window mean NLL (for paired comparisons)

    def to_dict(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "nll": self.nll, "n_tokens": self.n_tokens, "seconds": self.seconds,
                "protocol": self.protocol}


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
               desc: str = "perplexity") -> EvalResult:
    """Perplexity of ``model`` on ``windows`` by the standard protocol.

    Args:
        model: a causal LM returning ``.logits``.
        windows: (n, seq_len) token ids and their protocol fingerprint.
        batch_size: windows per forward pass (does not change the result beyond float rounding).
        device: where to run (default: the model's device).
        progress: show a tqdm bar with ETA on stderr.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise AdvisorError(f"--batch-size must be positive, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    per_window: list[float] = []
    n = len(windows)
    with tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False) as bar:
        for i in range(0, n, batch_size):
            batch = windows.ids[i : i + batch_size].to(device)
            nll = window_nll(model, batch)
            if not torch.isfinite(nll).all():
                raise AdvisorError(f"non-finite loss in windows {i}..{i + len(batch) - 1}: the model produces NaN/Inf "
                                   "(corrupted or badly quantized weights, or fp16 overflow: try --dtype float32)")
            per_window.extend(nll.tolist())
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(sum(per_window) / len(per_window)):.3f}")
    model.train(was_training)
    mean_nll = sum(per_window) / len(per_window)
    seq_len = windows.ids.shape[1]
    return EvalResult(ppl=math.exp(mean_nll), nll=mean_nll, n_tokens=n * (seq_len - 1),
                      seconds=time.perf_counter() - t0, protocol=dict(windows.protocol),
                      window_nll=tuple(per_window))
