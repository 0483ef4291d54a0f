"""The zoo's recorded results (``models/zoo/manifest.json``) and how they are measured.

Evaluation protocol (fixed; the same as ``advisor eval --model zoo:NAME --max-windows 40``):
``stdlib-code:eval`` text, tokenized with no special tokens, the first ``EVAL_WINDOWS`` = 40
non-overlapping windows of ``EVAL_SEQ_LEN`` = 512 tokens, each run independently in float32; the
perplexity is exp of the mean NLL over the 40 x 511 predicted tokens.

Unigram baseline: token frequencies counted on the whole ``stdlib-code:train`` token stream with
add-one (Laplace) smoothing over the 4096-token vocabulary, p(t) = (count(t) + 1) / (N + V),
scored on exactly the tokens the models predict (positions 1..511 of the same 40 windows).

The stdlib-code corpus is the running Python's standard library, so the numbers hold for the Python
version recorded in the manifest (``python``); the eval text's sha256 says exactly which text it was.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

from advisor.models.errors import AdvisorError

MANIFEST_PATH = Path(__file__).resolve().parent / "manifest.json"
EVAL_SPEC = "stdlib-code:eval"
EVAL_SEQ_LEN = 512
EVAL_WINDOWS = 40
UNIGRAM_SMOOTHING = "add-one (Laplace) over the vocabulary, counts from the stdlib-code train part"
MANIFEST_FORMAT = 1


def eval_windows_for(tokenizer):
    """The zoo's evaluation windows (see module docstring)."""
    from advisor.models.data import eval_windows, load_corpus

    return eval_windows(tokenizer, load_corpus(EVAL_SPEC), EVAL_SEQ_LEN, EVAL_WINDOWS)


def unigram_ppl(train_ids, eval_ids, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train_ids`` (n,), scored on the
    predicted tokens of ``eval_ids`` (windows, seq_len): positions 1.. of every window."""
    import torch

    counts = torch.bincount(train_ids.long(), minlength=vocab_size).double()
    logp = torch.log((counts + 1.0) / (counts.sum() + vocab_size))
    targets = eval_ids[:, 1:].reshape(-1)
    return float(torch.exp(-logp[targets].mean()))


def evaluate_folder(folder: Path, progress: bool = False) -> dict[str, Any]:
    """Load a model folder the way ``advisor eval`` does and measure it by the zoo protocol.

    Returns:
        dict with eval_ppl, eval_nll, eval_tokens, params, non_embedding_params, eval_text_sha256,
        and the windows (key ``_windows``, for the unigram baseline).
    """
    from advisor.models.evaluate import perplexity
    from advisor.models.loading import load

    loaded = load(str(folder))
    windows = eval_windows_for(loaded.tokenizer)
    res = perplexity(loaded.model, windows, batch_size=4, progress=progress, desc=Path(folder).name)
    return {"eval_ppl": res.ppl, "eval_nll": res.nll, "eval_tokens": res.n_tokens,
            "params": loaded.n_params(), "non_embedding_params": loaded.n_params(non_embedding=True),
            "eval_text_sha256": windows.protocol["text_sha256"], "_windows": windows}


def python_version() -> str:
    return platform.python_version()


def empty_manifest() -> dict[str, Any]:
    return {"format": MANIFEST_FORMAT, "python": python_version(), "models": []}


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, Any]:
    """The committed manifest (an empty one if the file does not exist yet)."""
    if not Path(path).is_file():
        return empty_manifest()
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise AdvisorError(f"zoo manifest {path} is not valid JSON ({e}); restore it from git") from e
    if data.get("format") != MANIFEST_FORMAT:
        raise AdvisorError(f"zoo manifest {path} has format {data.get('format')}, expected {MANIFEST_FORMAT}")
    return data


def manifest_models(manifest: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """name -> manifest entry, in manifest order."""
    manifest = load_manifest() if manifest is None else manifest
    return {m["name"]: m for m in manifest.get("models", [])}


def record(entry: dict[str, Any], protocol: dict[str, Any] | None, path: Path = MANIFEST_PATH,
           order: list[str] | None = None) -> dict[str, Any]:
    """Insert or replace one model's entry and (if given) the shared protocol fields; keep ``order``."""
    manifest = load_manifest(path)
    if manifest.get("eval", {}).get("text_sha256") not in (None, entry["eval_text_sha256"]):
        raise AdvisorError("the evaluation text differs from the one the manifest was measured on (another Python "
                           f"version? manifest: {manifest.get('python')}, running: {python_version()}); "
                           "rebuild the whole zoo with --force rather than mixing")
    if protocol:
        manifest.update(protocol)
    models = manifest_models(manifest)
    models[entry["name"]] = entry
    names = list(models)
    if order:
        rank = {n: i for i, n in enumerate(order)}
        names.sort(key=lambda n: rank.get(n, len(rank)))
    manifest["models"] = [models[n] for n in names]
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)
    return manifest


def protocol_block(eval_text_sha256: str, train_text_sha256: str, tokenizer_sha256: str,
                   unigram: float) -> dict[str, Any]:
    """Manifest fields shared by every model: corpus, protocol, tokenizer, baseline, software."""
    import tokenizers
    import torch
    import transformers

    return {
        "python": python_version(),
        "python_note": "the stdlib-code corpus is this Python's standard library; another version gives another text",
        "corpus": "stdlib-code",
        "eval": {"data": EVAL_SPEC, "seq_len": EVAL_SEQ_LEN, "n_windows": EVAL_WINDOWS,
                 "windows": "first-n-non-overlapping", "dtype": "float32", "text_sha256": eval_text_sha256},
        "train_text_sha256": train_text_sha256,
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "sha256": tokenizer_sha256},
        "unigram": {"smoothing": UNIGRAM_SMOOTHING, "ppl": unigram},
        "software": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "platform": sys.platform, "machine": platform.machine()},
        "default_model": "llama-xs",
    }


def markdown_table(manifest: dict[str, Any] | None = None) -> str:
    """The manifest as the docs' markdown table (docs/zoo.md)."""
    manifest = load_manifest() if manifest is None else manifest
    lines = ["| model | family | params total / non-embedding | train tokens | train time | eval ppl | unigram ppl "
             "| ppl / unigram | command |", "|---|---|---|---|---|---|---|---|---|"]
    for m in manifest.get("models", []):
        lines.append(f"| `zoo:{m['name']}` | {m['family']} | {m['params'] / 1e6:.3f}M / {m['non_embedding_params'] / 1e6:.3f}M "
                     f"| {m['train_tokens'] / 1e6:.2f}M | {m['train_seconds']:.0f} s | {m['eval_ppl']:.2f} "
                     f"| {m['unigram_ppl']:.1f} | {m['eval_ppl'] / m['unigram_ppl']:.3f} | `{m['command']}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
