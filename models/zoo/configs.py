"""The zoo's recipes: three architecture families x four sizes x two training lengths.

A :class:`Recipe` is everything needed to retrain one model: architecture, optimizer, schedule, data,
seed, numerics. ``recipe.json`` in every model folder and the manifest both hold it, so a model can be
rebuilt from either. The transformers config is built from the recipe (:func:`hf_config`), so every
loader, adapter, quantizer and probe sees an ordinary ``llama`` / ``gpt2`` / ``opt`` checkpoint.

Families (what differs between them is what quantization cares about: norms, activations, biases):
- ``llama``: RMSNorm, SwiGLU MLP (gate/up/down, hidden ~8/3 d), rotary positions, no biases.
- ``gpt2``: LayerNorm, GELU (tanh) MLP 4d, learned positions, biases, fused qkv (Conv1D).
- ``opt``: LayerNorm (pre-norm), ReLU MLP 4d, learned positions (offset 2), biases.
All use head dimension 32, untied input embedding and output head, no dropout, context 512.

Token budgets were planned from throughput measured on the 2-core build machine (single thread, bf16
autocast, 512-token windows, uncontended): about 8.5k tok/s (xs), 4.7k (s), 2.6k (m), 1.7k (l). The
whole zoo is ~6300 CPU-seconds, about 55 minutes with two single-threaded processes. Batch size 1
(one 512-token window per step): at ~1M-token budgets more, smaller steps learn much faster (llama-xs
at 300k tokens: 312 ppl with 600 steps of 1 window, 469 with 150 steps of 4). The ``-short``
checkpoints have their own, shorter cosine schedule (not a snapshot of the long run), so pre-trained
loss varies independently of size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from advisor.models.errors import AdvisorError, unknown_key_message

FAMILY_NAMES = ("llama", "gpt2", "opt")
VOCAB_SIZE = 4096
CONTEXT = 512
HEAD_DIM = 32

# size -> (d_model, n_layers); heads = d_model / HEAD_DIM. Non-embedding params ~ 12 * n_layers * d^2.
SIZES: dict[str, tuple[int, int]] = {
    "xs": (64, 2),  # ~0.1M non-embedding
    "s": (128, 3),  # ~0.6M
    "m": (192, 4),  # ~1.8M
    "l": (256, 6),  # ~4.7M
}
# Peak learning rate ~ 1/width (3e-3 at d=64): measured on 300k-token runs at batch 1, llama-s was best
# at 1.5e-3 (241 ppl; 249 at 1e-3, 298 at 3e-3), llama-xs at 3e-3 (312; 322 at 2e-3, 425 at 5e-3), and
# llama-l improved from 349 (2e-3) to 283 (7.5e-4).
LEARNING_RATES = {size: 3e-3 * 64 / d for size, (d, _) in SIZES.items()}
# Optimizer steps of one 512-token window. Larger models get more tokens (as in compute-optimal
# families): at these tiny budgets a deeper model starts slower, and equal tokens would not make
# perplexity fall with size. Size l had 3000 steps at first: llama-l (108.23) and opt-l (162.39) then
# only tied their m models (107.96, 162.18); 4000 steps make them clearly better (docs/zoo.md).
# The -short checkpoint trains about a quarter of the first plan's steps, but at least 600 (below
# that the smallest models do not beat the unigram baseline by 2x); pinned per size so that
# lengthening a long run does not change its short checkpoint.
LONG_STEPS = {"xs": 1200, "s": 1800, "m": 2400, "l": 4000}
SHORT_STEPS = {"xs": 600, "s": 600, "m": 600, "l": 750}
VARIANTS = ("long", "short")
# single-thread training throughput on the build machine (uncontended), for time estimates only
MEASURED_TOKENS_PER_SECOND = {"xs": 8_500, "s": 4_700, "m": 2_600, "l": 1_700}


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a zoo model's weights (with the committed tokenizer and the corpus)."""

    name: str
    family: str  # llama | gpt2 | opt
    size: str  # xs | s | m | l (or "tiny" in tests)
    variant: str  # long | short
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # MLP hidden width
    tie_embeddings: bool = False  # untied: tiny models learn bigram statistics much faster (measured)
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = CONTEXT
    seq_len: int = CONTEXT  # training window length
    batch_size: int = 1  # windows per optimizer step: at these budgets more, smaller steps learn faster
    steps: int = 2400
    lr: float = 3e-3  # peak
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup from 0
    weight_decay: float = 0.1  # on matrices only (not norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0  # model init (torch.manual_seed) and data order (torch.Generator)
    data: str = "stdlib-code:train"
    autocast: str = "bfloat16"  # forward/backward under CPU autocast; fp32 master weights and optimizer
    threads: int = 1  # torch intra-op threads: single-threaded CPU math is bitwise reproducible
    tokenizer_sha256: str = ""  # of tokenizer.json; checked before training

    def __post_init__(self) -> None:
        if self.family not in FAMILY_NAMES:
            raise AdvisorError(unknown_key_message("zoo family", self.family, FAMILY_NAMES))
        if self.d_model % self.n_heads:
            raise AdvisorError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.seq_len > self.max_position_embeddings:
            raise AdvisorError(f"seq_len {self.seq_len} > max_position_embeddings {self.max_position_embeddings}")
        if self.steps < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise AdvisorError("steps and batch_size must be positive, warmup_steps non-negative")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def train_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise AdvisorError(f"recipe has unknown fields {sorted(unknown)}; written by a newer version?")
        return cls(**d)

    def estimated_seconds(self) -> float:
        """Rough training time on the build machine (single thread), for messages."""
        tps = MEASURED_TOKENS_PER_SECOND.get(self.size, 3_000)
        return self.train_tokens / tps


def d_ff_for(family: str, d_model: int) -> int:
    """MLP hidden width: 4d for gpt2/opt; ~8/3 d rounded down to a multiple of 16 for SwiGLU (same params)."""
    if family == "llama":
        return max(16, int(8 * d_model / 3) // 16 * 16)
    return 4 * d_model


def make_recipe(family: str, size: str, variant: str = "long", **overrides: Any) -> Recipe:
    """The zoo's recipe for ``family``-``size`` (``variant`` long or short), with optional overrides."""
    if size not in SIZES:
        raise AdvisorError(unknown_key_message("zoo size", size, SIZES))
    if variant not in VARIANTS:
        raise AdvisorError(unknown_key_message("zoo variant", variant, VARIANTS))
    d, n_layers = SIZES[size]
    steps = LONG_STEPS[size]
    if variant == "short":
        steps = SHORT_STEPS[size]
    name = f"{family}-{size}" + ("-short" if variant == "short" else "")
    base = Recipe(name=name, family=family, size=size, variant=variant, d_model=d, n_layers=n_layers,
                  n_heads=d // HEAD_DIM, d_ff=d_ff_for(family, d), steps=steps, lr=LEARNING_RATES[size],
                  warmup_steps=max(10, math.ceil(0.05 * steps)))
    return replace(base, **overrides) if overrides else base


def default_recipes() -> dict[str, Recipe]:
    """Every zoo model's recipe as the code defines it, name -> recipe, in build order."""
    out = {}
    for family in FAMILY_NAMES:
        for size in SIZES:
            for variant in VARIANTS:
                r = make_recipe(family, size, variant)
                out[r.name] = r
    return out


def hf_config(recipe: Recipe):
    """The transformers config of a recipe (a LlamaConfig, GPT2Config or OPTConfig)."""
    common = dict(vocab_size=recipe.vocab_size, tie_word_embeddings=recipe.tie_embeddings, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0)  # id 0 is <|endoftext|>, never in training text: a safe padding_idx
    if recipe.family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=recipe.d_model, intermediate_size=recipe.d_ff,
                           num_hidden_layers=recipe.n_layers, num_attention_heads=recipe.n_heads,
                           num_key_value_heads=recipe.n_heads, max_position_embeddings=recipe.max_position_embeddings,
                           hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
                           attention_dropout=0.0, initializer_range=0.02, **common)
    if recipe.family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_embd=recipe.d_model, n_layer=recipe.n_layers, n_head=recipe.n_heads,
                          n_inner=recipe.d_ff, n_positions=recipe.max_position_embeddings,
                          activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          layer_norm_epsilon=1e-5, initializer_range=0.02, **common)
    from transformers import OPTConfig

    return OPTConfig(hidden_size=recipe.d_model, num_hidden_layers=recipe.n_layers, ffn_dim=recipe.d_ff,
                     num_attention_heads=recipe.n_heads, max_position_embeddings=recipe.max_position_embeddings,
                     word_embed_proj_dim=recipe.d_model, do_layer_norm_before=True, activation_function="relu",
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                     enable_bias=True, init_std=0.02, **common)
