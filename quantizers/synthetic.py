"""A seeded synthetic linear layer with realistic calibration statistics (tests and benchmarks).

Inputs ``x`` are correlated Gaussian vectors (a random mixing matrix with a decaying spectrum), with
log-normal per-channel magnitudes and a few outlier channels tens of times larger, as seen in LLM
activations; weights have heavy (Student-t) tails. Returns the weight and ``LayerStats`` with
``H = X^T X`` summed over tokens.
"""
from __future__ import annotations

import torch

from .base import LayerStats

__all__ = ["synthetic_layer"]


def synthetic_layer(
    out_features: int,
    in_features: int,
    n_tokens: int | None = None,
    seed: int = 0,
    n_outlier_channels: int = 4,
    outlier_scale: float = 20.0,
) -> tuple[torch.Tensor, LayerStats, torch.Tensor]:
    """Build ``(W (out, in), LayerStats, X (n_tokens, in))``; everything derives from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    n_tokens = n_tokens or 4 * in_features
    # mixing with a decaying spectrum -> strongly correlated channels
    Qm, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=g))
    spectrum = 1.0 / torch.arange(1, in_features + 1, dtype=torch.float32).sqrt()
    mix = Qm * spectrum[None, :] @ Qm.t() + 0.1 * torch.eye(in_features)
    channel = torch.exp(0.5 * torch.randn(in_features, generator=g))
    outliers = torch.randperm(in_features, generator=g)[:n_outlier_channels]
    channel[outliers] *= outlier_scale
    Z = torch.randn(n_tokens, in_features, generator=g)
    X = (Z @ mix.t()) * channel[None, :] + 0.05 * channel[None, :]  # small per-channel mean
    # heavy-tailed weights: Student-t with 5 degrees of freedom
    normal = torch.randn(out_features, in_features, generator=g)
    chi2 = torch.randn(5, out_features, in_features, generator=g).pow(2).sum(0)
    W = 0.02 * normal / (chi2 / 5).sqrt()
    X = X.to(torch.float32)
    stats = LayerStats(H=X.t() @ X, n_tokens=n_tokens, act_abs_mean=X.abs().mean(0))
    return W.to(torch.float32), stats, X
