"""The project's own small language models: three families (llama, gpt2, opt) x four sizes x two
training lengths, trained reproducibly on the stdlib-code corpus (see docs/zoo.md).

``zoo:NAME`` names them wherever a model is accepted; ``zoo:default`` is the embedded llama-xs.
This module stays light (no torch import), so ``advisor ls`` starts fast.
"""
from __future__ import annotations

from advisor.models.zoo.resolve import recipe_for, resolve_zoo_model, zoo_entries, zoo_names

__all__ = ["recipe_for", "resolve_zoo_model", "zoo_entries", "zoo_names"]
