"""Models: loading, architecture adapters, corpora, perplexity evaluation, quantization pipeline."""
from __future__ import annotations

from typing import Any


def load(name: str, **kwargs: Any):
    """Load a model; see :func:`models.loading.load` (imported lazily to keep the CLI fast)."""
    from advisor.models.loading import load as _load

    return _load(name, **kwargs)
