"""Corpora and the windows cut from them for calibration and evaluation.

Corpus specs (``advisor ls datasets``):
- ``wikitext2`` / ``wikitext2:PATH``: WikiText-2 raw v1, test split. From the hub through ``datasets``,
  or from a local ``wiki.test.raw``; either way the rows are joined with "\\n\\n" (the GPTQ protocol).
  A local file's lines are the hub rows; a blank line is an empty row.
- ``ptb`` / ``ptb:PATH``: Penn Treebank (ptb_text_only) validation, rows joined with "\\n\\n".
- ``c4`` / ``c4:PATH``: C4 English validation shard 0, first 1100 documents joined with " ".
- ``file:PATH``: any UTF-8 text file, read as plain text.
- ``stdlib-code[:PART]``: the running Python's standard library sources, split by a hash of each
  file's path into ``train`` (80%), ``calib`` (10%) and ``eval`` (10%) parts that never overlap. It is
  present on every machine, so it serves the embedded default. It depends on the Python version; the
  text's sha256 in every protocol fingerprint says exactly which text was used.

Evaluation windows are the first ``max_windows`` non-overlapping windows of the tokenized corpus.
Calibration windows are drawn at seeded random offsets from the calibration corpus; when it is the
same corpus as the evaluation one, only from the tokens after the evaluation region, so the two never
overlap.

Beginning of sequence (``bos``): with ``never`` a window is ``seq_len`` text tokens (the GPTQ papers'
protocol, written for OPT and LLaMA-1). With ``always`` it is the tokenizer's BOS token followed by
``seq_len - 1`` text tokens, as lm-evaluation-harness and llama.cpp's ``llama-perplexity`` feed a model
that is trained to see BOS first; the BOS position is context, never a scored target, so both
conventions score ``seq_len - 1`` text tokens per window. ``auto`` (the default) prepends BOS when the
tokenizer adds one to its own encodings (``add_bos_token`` or its post-processor) and the id exists in
the model's vocabulary. The resolved convention is part of every window protocol (``bos_token_id``), so
figures measured under different conventions are never mixed; ``never`` leaves the protocol as it
always was, so records measured before the option existed keep their fingerprints.
"""
from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from advisor.models.errors import DataError, unknown_key_message

STDLIB_PARTS = {"train": (0, 80), "calib": (80, 90), "eval": (90, 100)}
_STDLIB_SKIP = ("site-packages/", "test/", "idlelib/", "lib2to3/tests/", "tkinter/test/")


@dataclass(frozen=True)
class Corpus:
    name: str  # the spec the user gave
    text: str
    protocol: dict[str, Any]  # dataset, source, split, join, text_sha256, ...


BOS_MODES = ("auto", "always", "never")


@dataclass
class Windows:
    ids: torch.Tensor  # (n_windows, seq_len) int64
    protocol: dict[str, Any] = field(default_factory=dict)
    offsets: tuple[int, ...] = ()  # where each window's text tokens start in the tokenized corpus

    def __len__(self) -> int:
        return int(self.ids.shape[0])


# -- corpora ------------------------------------------------------------------------------------
def _rows_from_lines(path: Path) -> list[str]:
    """A local WikiText/PTB file as the hub's rows: each line keeps its newline; blank lines are ''."""
    with open(path, encoding="utf-8") as f:
        return ["" if line.strip() == "" else line for line in f]


def stdlib_files(part: str) -> list[Path]:
    """The standard-library source files of one part, sorted by relative path."""
    if part not in STDLIB_PARTS:
        raise DataError(unknown_key_message("stdlib-code part", part, STDLIB_PARTS))
    root = Path(sysconfig.get_paths()["stdlib"])
    lo, hi = STDLIB_PARTS[part]
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(_STDLIB_SKIP) or "/test/" in rel or "/tests/" in rel:
            continue
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100
        if lo <= bucket < hi:
            out.append(p)
    return out


def stdlib_text(part: str) -> str:
    """One part of the stdlib-code corpus: files joined with a blank line, in path order."""
    chunks = []
    for p in stdlib_files(part):
        try:
            chunks.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return "\n\n".join(chunks)


def _hub_rows(path: str, name: str | None, split: str, column: str) -> list[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(path, name, split=split)
    except Exception as e:  # offline, not cached, renamed: all surface here
        raise DataError(
            f"could not load the {path}/{name or ''} {split} split through `datasets` ({type(e).__name__}: "
            f"{str(e)[:200]}). Without network give a local copy, e.g. wikitext2:/path/to/wiki.test.raw"
        ) from e
    return list(ds[column])


def _read_local(spec: str, path_str: str) -> Path:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DataError(f"corpus file for {spec!r} not found: {path}")
    return path


def load_corpus(spec: str) -> Corpus:
    """Load a corpus by spec (see module docstring).

    Raises:
        DataError: unknown corpus name, missing file, hub unreachable, empty text.
    """
    name, _, arg = spec.partition(":")
    proto: dict[str, Any] = {"dataset": name}
    if name == "wikitext2":
        if arg:
            rows = _rows_from_lines(_read_local(spec, arg))
            proto.update(source=str(Path(arg).name), split="test", format="hub-rows-joined")
        else:
            rows = _hub_rows("wikitext", "wikitext-2-raw-v1", "test", "text")
            proto.update(source="hub:wikitext/wikitext-2-raw-v1", split="test", format="hub-rows-joined")
        text, proto["join"] = "\n\n".join(rows), "\\n\\n"
    elif name == "ptb":
        if arg:
            rows = _rows_from_lines(_read_local(spec, arg))
            proto.update(source=str(Path(arg).name), split="validation", format="hub-rows-joined")
        else:
            rows = _hub_rows("ptb_text_only", None, "validation", "sentence")
            proto.update(source="hub:ptb_text_only", split="validation", format="hub-rows-joined")
        text, proto["join"] = "\n\n".join(rows), "\\n\\n"
    elif name == "c4":
        if arg:
            path = _read_local(spec, arg)
            if path.suffix in (".json", ".jsonl", ".gz"):
                from datasets import load_dataset

                rows = list(load_dataset("json", data_files=str(path), split="train")["text"])[:1100]
            else:
                rows = path.read_text(encoding="utf-8").splitlines()[:1100]
            proto.update(source=path.name)
        else:
            from datasets import load_dataset

            try:
                ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                  split="validation")
            except Exception as e:
                raise DataError(f"could not load C4 through `datasets` ({type(e).__name__}); give c4:/path/to/file.json.gz") from e
            rows = list(ds["text"][:1100])
            proto.update(source="hub:allenai/c4 en/c4-validation.00000-of-00008")
        text = " ".join(rows)
        proto.update(split="validation", join=" ", format="first-1100-docs")
    elif name == "file":
        if not arg:
            raise DataError("file: needs a path, e.g. file:/data/my_corpus.txt")
        path = _read_local(spec, arg)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e}); convert it first") from e
        proto.update(source=path.name, split="all", format="plain-text")
    elif name == "stdlib-code":
        part = arg or "eval"
        text = stdlib_text(part)
        import sys

        proto.update(source=f"python{sys.version_info.major}.{sys.version_info.minor} stdlib",
                     split=part, format="files-joined", join="\\n\\n")
    else:
        raise DataError(unknown_key_message("dataset", name, DATASETS) + " Use NAME:PATH for a local copy.")
    if not text.strip():
        raise DataError(f"corpus {spec!r} is empty")
    proto["text_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    proto["n_chars"] = len(text)
    return Corpus(name=spec, text=text, protocol=proto)


DATASETS = {
    "wikitext2": "WikiText-2 raw v1 test split, rows joined with \\n\\n (GPTQ protocol); wikitext2:PATH for a local wiki.test.raw",
    "ptb": "Penn Treebank validation (ptb_text_only), rows joined with \\n\\n; ptb:PATH for a local ptb.valid.txt",
    "c4": "C4 English validation shard 0, first 1100 documents joined by spaces; c4:PATH for a local shard",
    "file": "file:PATH, any UTF-8 text file read as plain text",
    "stdlib-code": "this Python's standard library sources, hashed into train/calib/eval parts (default eval); works offline",
}


# -- tokenization and windows -----------------------------------------------------------------------
def tokenizer_id(tokenizer) -> str:
    """A short identity of a tokenizer: its name and a hash of its vocabulary."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(repr(sorted(vocab.items())).encode()).hexdigest()[:12]
    return f"{getattr(tokenizer, 'name_or_path', '') and Path(str(tokenizer.name_or_path)).name or type(tokenizer).__name__}:{len(vocab)}:{h}"


def tokenize(tokenizer, corpus: Corpus) -> torch.Tensor:
    """Token ids of the whole corpus (one call, no special tokens), int64 (n_tokens,)."""
    enc = tokenizer(corpus.text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first in its own encodings, as ``tokenizer(text)`` does by
    default. The encoding decides, not the ``add_bos_token`` attribute: a post-processor template can add
    BOS while the attribute says False, and the encoding is what the model saw in training and use."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a", add_special_tokens=True, return_attention_mask=False, verbose=False)["input_ids"]
    except Exception:  # a tokenizer that cannot encode with special tokens: fall back on its flag
        return getattr(tokenizer, "add_bos_token", False) is True
    return bool(ids) and ids[0] == bos


def resolve_bos(tokenizer, bos: str = "auto", vocab_size: int | None = None) -> int | None:
    """The BOS id each window starts with under the convention ``bos`` (``auto|always|never``), or None.

    Raises:
        DataError: an unknown mode, or ``always`` for a tokenizer without a BOS token in the vocabulary.
    """
    if bos not in BOS_MODES:
        raise DataError(f"--bos must be one of {', '.join(BOS_MODES)}, got {bos!r}")
    if bos == "never":
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    exists = bos_id is not None and (vocab_size is None or 0 <= int(bos_id) < vocab_size)
    if bos == "always":
        if not exists:
            raise DataError("--bos always: this tokenizer has no beginning-of-sequence token"
                            + (f" inside the model's vocabulary of {vocab_size}" if bos_id is not None else "")
                            + "; use --bos auto or never")
        return int(bos_id)
    return int(bos_id) if exists and tokenizer_adds_bos(tokenizer) else None


def _check_seq_len(seq_len: int, max_context: int | None, bos_id: int | None = None) -> None:
    if seq_len < 2 + (bos_id is not None):
        raise DataError(f"--seq-len must be at least {2 + (bos_id is not None)} tokens"
                        f"{' with a BOS token' if bos_id is not None else ''}, got {seq_len}")
    if max_context is not None and seq_len > max_context:
        raise DataError(f"--seq-len {seq_len} is beyond the model's context of {max_context} tokens; "
                        f"use --seq-len {max_context} or less")


def _bos_protocol(bos_id: int | None, mode: str) -> dict[str, Any]:
    """The window protocol's BOS entries: ``bos_token_id`` (hashed into fingerprints) only when BOS is
    prepended, so ``never`` keeps the fingerprints of the protocol without BOS."""
    return {"bos": mode} if bos_id is None else {"bos": mode, "bos_token_id": bos_id}


def _with_bos(text_windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return text_windows
    col = torch.full((text_windows.shape[0], 1), bos_id, dtype=text_windows.dtype)
    return torch.cat([col, text_windows], dim=1)


def text_tokens_per_window(protocol: dict[str, Any]) -> int:
    """Corpus tokens one window of ``protocol`` consumes (``seq_len`` less the BOS position)."""
    return int(protocol["seq_len"]) - (protocol.get("bos_token_id") is not None)


def eval_windows(tokenizer, corpus: Corpus, seq_len: int, max_windows: int | None = None,
                 max_context: int | None = None, ids: torch.Tensor | None = None, bos: str = "never",
                 vocab_size: int | None = None) -> Windows:
    """The first ``max_windows`` non-overlapping windows of ``seq_len`` tokens (tail dropped); under a
    BOS convention each is BOS + ``seq_len - 1`` text tokens (see the module docstring).

    Raises:
        DataError: corpus shorter than one window, or seq_len beyond the model's context.
    """
    bos_id = resolve_bos(tokenizer, bos, vocab_size)
    _check_seq_len(seq_len, max_context, bos_id)
    ids = tokenize(tokenizer, corpus) if ids is None else ids
    step = seq_len - (bos_id is not None)
    n_avail = ids.numel() // step
    if n_avail == 0:
        raise DataError(f"corpus {corpus.name!r} has {ids.numel()} tokens, fewer than one window of "
                        f"--seq-len {seq_len}; use a longer corpus or a smaller --seq-len")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"--max-windows must be positive, got {max_windows}")
    n = n_avail if max_windows is None else min(n_avail, max_windows)
    windows = _with_bos(ids[: n * step].view(n, step), bos_id)
    proto = dict(corpus.protocol, role="eval", tokenizer=tokenizer_id(tokenizer), add_special_tokens=False,
                 n_corpus_tokens=int(ids.numel()), seq_len=seq_len, n_windows=n, windows="first-n-non-overlapping",
                 **_bos_protocol(bos_id, bos))
    return Windows(ids=windows, protocol=proto, offsets=tuple(range(0, n * step, step)))


def more_eval_windows(tokenizer, corpus: Corpus, ev: Windows, n_more: int, avoid: Windows | None = None) -> Windows:
    """Up to ``n_more`` further windows after ``ev``'s, on the same grid, skipping any that overlaps a window
    of ``avoid`` (the calibration windows) from the same text: a sequential test's extra evidence.
    May return fewer (or none) when the corpus runs out."""
    bos_id = ev.protocol.get("bos_token_id")
    step = text_tokens_per_window(ev.protocol)
    ids = tokenize(tokenizer, corpus)
    spans = []
    if avoid is not None and avoid.protocol.get("text_sha256") == corpus.protocol["text_sha256"]:
        a_step = text_tokens_per_window(avoid.protocol)
        spans = [(o, o + a_step) for o in avoid.offsets]
    rows, offsets = [], []
    k = len(ev)
    while len(rows) < n_more and (k + 1) * step <= ids.numel():
        lo, hi = k * step, (k + 1) * step
        if not any(lo < b and a < hi for a, b in spans):
            rows.append(ids[lo:hi])
            offsets.append(lo)
        k += 1
    windows = _with_bos(torch.stack(rows), bos_id) if rows else torch.empty((0, ev.ids.shape[1]), dtype=torch.long)
    proto = dict(ev.protocol, role="eval-extension", n_windows=len(rows), windows="next-non-overlapping-after-eval")
    return Windows(ids=windows, protocol=proto, offsets=tuple(offsets))


def calibration_windows(tokenizer, corpus: Corpus, n_windows: int, seq_len: int, seed: int = 0,
                        exclude: Windows | None = None, max_context: int | None = None, bos: str = "never",
                        vocab_size: int | None = None) -> Windows:
    """``n_windows`` random windows of ``seq_len`` tokens at seeded offsets (BOS first under a BOS
    convention, as in :func:`eval_windows`).

    When ``exclude`` comes from the same text (same sha256), windows are drawn only from tokens after
    the evaluation region, so calibration never sees evaluation tokens.
    """
    bos_id = resolve_bos(tokenizer, bos, vocab_size)
    _check_seq_len(seq_len, max_context, bos_id)
    if n_windows < 1:
        raise DataError(f"the number of calibration windows must be positive, got {n_windows}")
    ids = tokenize(tokenizer, corpus)
    start = 0
    if exclude is not None and exclude.protocol.get("text_sha256") == corpus.protocol["text_sha256"]:
        start = exclude.protocol["n_windows"] * text_tokens_per_window(exclude.protocol)
    step = seq_len - (bos_id is not None)
    usable = ids.numel() - start
    if usable < step:
        raise DataError(f"calibration corpus {corpus.name!r} has {usable} usable tokens (after excluding the "
                        f"evaluation windows), fewer than one window of {seq_len}; use a different --calib")
    rng = random.Random(seed)
    offsets = sorted(start + rng.randrange(0, usable - step + 1) for _ in range(n_windows))
    windows = _with_bos(torch.stack([ids[o : o + step] for o in offsets]), bos_id)
    proto = dict(corpus.protocol, role="calibration", tokenizer=tokenizer_id(tokenizer), seq_len=seq_len,
                 n_windows=n_windows, seed=seed, region_start_token=start, windows="seeded-random-offsets",
                 **_bos_protocol(bos_id, bos))
    return Windows(ids=windows, protocol=proto, offsets=tuple(offsets))
