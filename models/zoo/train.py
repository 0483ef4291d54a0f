"""Train one zoo model from its recipe: deterministic, bf16 autocast on CPU, fp32 master weights.

Determinism: the model is initialized after ``torch.manual_seed(recipe.seed)``; the data order is a
permutation of the corpus's non-overlapping ``seq_len`` chunks drawn from a ``torch.Generator`` seeded
with ``recipe.seed`` (a fresh permutation each epoch); training runs with ``recipe.threads`` intra-op
threads (1 by default) and ``torch.use_deterministic_algorithms(True)``. With one thread the same recipe
gives bitwise-identical weights on the same machine and software (``tests/test_zoo_train.py`` checks
it); other thread counts, CPUs (bf16 kernels differ by instruction set) or torch versions round
differently and land close, not equal.

Optimizer: AdamW (betas, eps, weight decay on matrices only), linear warmup then cosine decay to
``lr * min_lr_ratio``, gradient clipping by global norm. The loss is the mean next-token cross-entropy
computed in fp32 from the autocast logits.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from advisor.models.errors import AdvisorError
from advisor.models.zoo.configs import Recipe, hf_config

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: nn.Module
    recipe: Recipe
    losses: list[float]  # training loss per step
    seconds: float
    tokens: int  # tokens seen (steps * batch * seq_len)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last 10% of steps (smooths batch noise)."""
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[-k:]) / k


# -- data ---------------------------------------------------------------------------------------
def corpus_token_ids(spec: str, tokenizer, cache_dir: Path | None = None) -> tuple[torch.Tensor, str]:
    """Token ids of a corpus (no special tokens) and the text's sha256; cached on disk by (text, tokenizer).

    Returns:
        ids int64 (n_tokens,), text sha256.
    """
    import numpy as np

    from advisor.models.data import load_corpus, tokenize, tokenizer_id

    corpus = load_corpus(spec)
    sha = corpus.protocol["text_sha256"]
    if cache_dir is None:
        from advisor.models.paths import advisor_home

        cache_dir = advisor_home() / "zoo" / "_cache"
    tok_key = hashlib.sha256(tokenizer_id(tokenizer).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"tokens-{sha[:16]}-{tok_key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path).astype(np.int64)), sha
    ids = tokenize(tokenizer, corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(ids)}.npy")
    np.save(tmp, ids.numpy().astype(np.int32))
    tmp.replace(path)
    return ids, sha


def batch_order(n_tokens: int, recipe: Recipe) -> Iterator[torch.Tensor]:
    """Start offsets (batch_size,) of each step's windows: seeded permutations of non-overlapping chunks."""
    n_chunks = n_tokens // recipe.seq_len
    if n_chunks < recipe.batch_size:
        raise AdvisorError(f"training corpus has {n_tokens} tokens, fewer than one batch of "
                           f"{recipe.batch_size} x {recipe.seq_len}")
    gen = torch.Generator().manual_seed(recipe.seed)
    perm, pos = torch.randperm(n_chunks, generator=gen), 0
    for _ in range(recipe.steps):
        if pos + recipe.batch_size > n_chunks:  # next epoch: a new permutation (the tail is dropped)
            perm, pos = torch.randperm(n_chunks, generator=gen), 0
        yield perm[pos : pos + recipe.batch_size] * recipe.seq_len
        pos += recipe.batch_size


def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    floor = recipe.lr * recipe.min_lr_ratio
    return floor + (recipe.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices of linear layers only; not on embeddings, norms or biases."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextlib.contextmanager
def deterministic_cpu(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads and deterministic algorithms; restore the caller's settings."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


# -- training -----------------------------------------------------------------------------------
def build_model(recipe: Recipe) -> nn.Module:
    """A freshly initialized model of the recipe's architecture (seeded), fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(hf_config(recipe), dtype=torch.float32)
    return model


def train(recipe: Recipe, tokenizer=None, progress: bool = True, position: int = 0,
          threads: int | None = None) -> TrainResult:
    """Train a model from scratch by ``recipe``.

    Args:
        recipe: architecture, data, optimizer, schedule, seed, numerics.
        tokenizer: defaults to the committed zoo tokenizer (its sha256 must match the recipe's, if set).
        progress: tqdm bar with loss, tokens/s and ETA on stderr.
        position: tqdm line (parallel builds).
        threads: override ``recipe.threads`` (results then differ by float rounding).
    """
    from tqdm.auto import tqdm

    from advisor.models.zoo.bpe import load_tokenizer, tokenizer_sha256

    if tokenizer is None:
        if recipe.tokenizer_sha256 and recipe.tokenizer_sha256 != tokenizer_sha256():
            raise AdvisorError(f"recipe {recipe.name!r} was trained with tokenizer {recipe.tokenizer_sha256[:12]}, "
                               f"but the committed tokenizer is {tokenizer_sha256()[:12]}; weights would not be comparable")
        tokenizer = load_tokenizer()
    ids, text_sha = corpus_token_ids(recipe.data, tokenizer)
    autocast_dtype = {"bfloat16": torch.bfloat16, "float32": None}.get(recipe.autocast, "bad")
    if autocast_dtype == "bad":
        raise AdvisorError(f"recipe autocast must be bfloat16 or float32, got {recipe.autocast!r}")

    with deterministic_cpu(threads or recipe.threads):
        model = build_model(recipe)
        model.train()
        opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                betas=(recipe.beta1, recipe.beta2), eps=recipe.eps, foreach=False)
        offsets_of_step = batch_order(ids.numel(), recipe)
        window = torch.arange(recipe.seq_len)
        losses: list[float] = []
        t0 = time.perf_counter()
        bar = tqdm(total=recipe.steps, desc=recipe.name, unit="step", disable=not progress, position=position,
                   leave=position == 0, mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
        smooth = None
        for step, offsets in enumerate(offsets_of_step):
            batch = ids[offsets[:, None] + window[None, :]]  # (batch, seq_len)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, recipe)
            with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                logits = model(input_ids=batch, use_cache=False).logits  # (batch, seq_len, vocab)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            if not torch.isfinite(loss):
                bar.close()
                raise AdvisorError(f"{recipe.name}: non-finite training loss at step {step}; lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            smooth = losses[-1] if smooth is None else 0.95 * smooth + 0.05 * losses[-1]
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{smooth:.3f}", tok_s=f"{(step + 1) * recipe.tokens_per_step / elapsed:.0f}",
                            refresh=False)
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - t0
    model.eval()
    info = {"train_text_sha256": text_sha, "train_corpus_tokens": int(ids.numel()),
            "threads": threads or recipe.threads, "torch": torch.__version__}
    return TrainResult(model=model, recipe=recipe, losses=losses, seconds=seconds, tokens=recipe.train_tokens, info=info)


def save_model(result: TrainResult, out: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a self-contained Hugging Face folder: safetensors weights, config, tokenizer, recipe.json,
    train_log.json. Written to a temporary sibling and renamed, so a folder is either complete or absent."""
    import shutil

    from advisor.models.zoo.bpe import copy_tokenizer

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    result.model.save_pretrained(str(tmp), safe_serialization=True)
    copy_tokenizer(tmp)
    (tmp / "recipe.json").write_text(json.dumps(result.recipe.to_dict(), indent=2) + "\n")
    k = max(1, len(result.losses) // 50)
    log_data = {"train_seconds": result.seconds, "train_tokens": result.tokens, "final_train_loss": result.final_loss,
                "loss_every_step": [round(x, 5) for x in result.losses[::k]], "loss_stride": k,
                **result.info, **(extra or {})}
    (tmp / "train_log.json").write_text(json.dumps(log_data, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
