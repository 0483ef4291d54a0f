"""The zoo's tokenizer: a byte-level BPE (4096 tokens) trained on the stdlib-code train part.

It is committed under ``models/zoo/tokenizer/`` (``tokenizer.json`` + ``tokenizer_config.json``) and
copied into every zoo model folder, so each folder loads with ``AutoTokenizer.from_pretrained``.
Training it is deterministic (same text -> same ``tokenizer.json`` bytes); regenerate it with
``python -m models.zoo.bpe`` (this changes every zoo model: retrain them afterwards).

Byte-level: every byte is in the base alphabet, so any text encodes without unknown tokens and
decodes back exactly. ``<|endoftext|>`` (id 0) is the only special token; the corpus never holds it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from advisor.models.zoo.configs import VOCAB_SIZE

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
EOS = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
                    "pad_token": EOS, "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}


def train_bpe(text: str, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE on ``text`` (split at blank lines into pieces); returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    pieces = text.split("\n\n")
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    return tok


def build_tokenizer_folder(out: Path = TOKENIZER_DIR, vocab_size: int = VOCAB_SIZE) -> str:
    """Train on ``stdlib_text("train")`` and save a transformers tokenizer folder; returns tokenizer.json's sha256."""
    from advisor.models.data import stdlib_text

    import json

    out.mkdir(parents=True, exist_ok=True)
    train_bpe(stdlib_text("train"), vocab_size).save(str(out / "tokenizer.json"))
    # written by hand, not by save_pretrained: transformers 5 would name its own backend class, which
    # transformers 4.x cannot load; PreTrainedTokenizerFast loads in both
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2, sort_keys=True) + "\n")
    return tokenizer_sha256(out)


def tokenizer_sha256(folder: Path = TOKENIZER_DIR) -> str:
    """sha256 of ``tokenizer.json`` (vocabulary + merges + pipeline): the tokenizer's identity."""
    return hashlib.sha256((Path(folder) / "tokenizer.json").read_bytes()).hexdigest()


def load_tokenizer(folder: Path = TOKENIZER_DIR):
    """The committed tokenizer as a transformers fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def copy_tokenizer(dest: Path, folder: Path = TOKENIZER_DIR) -> None:
    """Copy the tokenizer files into a model folder (byte-identical)."""
    import shutil

    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(folder) / name, Path(dest) / name)


if __name__ == "__main__":
    print(build_tokenizer_folder())
