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

Evaluation windows are the first ``max_windows`` non-overlapping ``seq_len`` windows of the
tokenized corpus (standard protocol). Calibration windows are drawn at seeded random offsets from the
calibration corpus; when it is the same corpus as the evaluation one, only from the tokens after the
evaluation region, so the two never overlap.
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


@dataclass
class Windows:
    ids: torch.Tensor  # (n_windows, seq_len) int64
    protocol: dict[str, Any] = field(default_factory=dict)

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


def _check_seq_len(seq_len: int, max_context: int | None) -> None:
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if max_context is not None and seq_len > max_context:
        raise DataError(f"--seq-len {seq_len} is beyond the model's context of {max_context} tokens; "
                        f"use --seq-len {max_context} or less")


def eval_windows(tokenizer, corpus: Corpus, seq_len: int, max_windows: int | None = None,
                 max_context: int | None = None, ids: torch.Tensor | None = None) -> Windows:
    """The first ``max_windows`` non-overlapping windows of ``seq_len`` tokens (tail dropped).

    Raises:
        DataError: corpus shorter than one window, or seq_len beyond the model's context.
    """
    _check_seq_len(seq_len, max_context)
    ids = tokenize(tokenizer, corpus) if ids is None else ids
    n_avail = ids.numel() // seq_len
    if n_avail == 0:
        raise DataError(f"corpus {corpus.name!r} has {ids.numel()} tokens, fewer than one window of "
                        f"--seq-len {seq_len}; use a longer corpus or a smaller --seq-len")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"--max-windows must be positive, got {max_windows}")
    n = n_avail if max_windows is None else min(n_avail, max_windows)
    windows = ids[: n * seq_len].view(n, seq_len)
    proto = dict(corpus.protocol, role="eval", tokenizer=tokenizer_id(tokenizer), add_special_tokens=False,
                 n_corpus_tokens=int(ids.numel()), seq_len=seq_len, n_windows=n, windows="first-n-non-overlapping")
    return Windows(ids=windows, protocol=proto)


def calibration_windows(tokenizer, corpus: Corpus, n_windows: int, seq_len: int, seed: int = 0,
                        exclude: Windows | None = None, max_context: int | None = None) -> Windows:
    """``n_windows`` random windows of ``seq_len`` tokens at seeded offsets.

    When ``exclude`` comes from the same text (same sha256), windows are drawn only from tokens after
    the evaluation region, so calibration never sees evaluation tokens.
    """
    _check_seq_len(seq_len, max_context)
    if n_windows < 1:
        raise DataError(f"the number of calibration windows must be positive, got {n_windows}")
    ids = tokenize(tokenizer, corpus)
    start = 0
    if exclude is not None and exclude.protocol.get("text_sha256") == corpus.protocol["text_sha256"]:
        start = exclude.protocol["n_windows"] * exclude.protocol["seq_len"]
    usable = ids.numel() - start
    if usable < seq_len:
        raise DataError(f"calibration corpus {corpus.name!r} has {usable} usable tokens (after excluding the "
                        f"evaluation windows), fewer than one window of {seq_len}; use a different --calib")
    rng = random.Random(seed)
    offsets = sorted(start + rng.randrange(0, usable - seq_len + 1) for _ in range(n_windows))
    windows = torch.stack([ids[o : o + seq_len] for o in offsets])
    proto = dict(corpus.protocol, role="calibration", tokenizer=tokenizer_id(tokenizer), seq_len=seq_len,
                 n_windows=n_windows, seed=seed, region_start_token=start, windows="seeded-random-offsets")
    return Windows(ids=windows, protocol=proto)
