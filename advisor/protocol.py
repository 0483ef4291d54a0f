"""The measurement protocol: one value that says how every measurement of a model is taken.

A :class:`Protocol` names the evaluation and calibration texts, the window length, how many windows
of each, the calibration seed, the beginning-of-sequence convention and the evaluation batch size. It
is built in one place from CLI arguments (:meth:`Protocol.from_args`, over the options that
:func:`add_protocol_args` registers identically on every measuring command) or from API keywords
(:meth:`Protocol.from_kwargs`), and it cuts every window the product measures on: evaluation,
quantization calibration, the probes' windows and the rtn_loss windows. So ``advisor quantize`` with
the options ``advisor recommend`` was given measures exactly what recommend verified, and a sweep's runs
match the probes and baselines of a later prediction.

How the model itself is loaded (device, dtype, remote code) is not part of the protocol: it travels
next to it, as the loader's options (``ModelOptions``), because it does not change what a figure means.

This module imports nothing heavy at import time: the CLI reads the defaults from it for ``--help``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from advisor.models.errors import AdvisorError

BOS_MODES = ("auto", "always", "never")  # the same tuple as advisor.models.data.BOS_MODES (a test checks)


@dataclass(frozen=True)
class Protocol:
    """How a model is measured. Every field except ``batch_size`` changes what is measured and is
    recorded in the windows' protocol fingerprint (``batch_size`` changes only float rounding)."""

    eval: str = "stdlib-code:eval"  # evaluation corpus spec (`advisor ls datasets`)
    calib: str = "stdlib-code:calib"  # calibration corpus spec
    seq_len: int = 512  # tokens per evaluation window
    max_windows: int | None = 20  # evaluation windows (None: the whole corpus)
    n_calib: int = 16  # calibration windows for the solvers (and the rtn_loss probe)
    calib_seq_len: int | None = None  # tokens per calibration window (None: seq_len)
    seed: int = 0  # calibration offsets and every probe
    bos: str = "auto"  # beginning-of-sequence convention: auto | always | never
    batch_size: int = 1  # evaluation windows per forward pass

    def __post_init__(self) -> None:
        for name, value in (("--eval", self.eval), ("--calib", self.calib)):
            if not isinstance(value, str) or not value.strip():
                raise AdvisorError(f"{name} must name a corpus (see `advisor ls datasets`), got {value!r}")
        _positive_int("--seq-len", self.seq_len, minimum=2)
        if self.max_windows is not None:
            _positive_int("--max-windows", self.max_windows)
        _positive_int("--n-calib", self.n_calib)
        if self.calib_seq_len is not None:
            _positive_int("--calib-seq-len", self.calib_seq_len, minimum=2)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise AdvisorError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.bos not in BOS_MODES:
            raise AdvisorError(f"--bos must be one of {', '.join(BOS_MODES)}, got {self.bos!r}")
        _positive_int("--batch-size", self.batch_size)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, protocol: "Protocol | None" = None, **kwargs: Any) -> "Protocol":
        """The API's way in: a ``Protocol``, or its fields as keywords (``seq_len=256, bos="never"``),
        or a Protocol with some fields replaced. Unknown keywords are refused by name."""
        base = protocol if protocol is not None else cls()
        if not isinstance(base, cls):
            raise AdvisorError(f"protocol must be an advisor.protocol.Protocol, got {type(base).__name__}")
        names = {f.name for f in fields(base)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise AdvisorError(f"unknown protocol option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return type(base)(**{**asdict(base), **kwargs}) if kwargs else base

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Protocol":
        """The protocol that :func:`add_protocol_args` parsed."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(Protocol)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def calibration_seq_len(self) -> int:
        return self.calib_seq_len or self.seq_len

    # -- windows ----------------------------------------------------------------------------------
    def eval_windows(self, loaded):
        """The evaluation windows on ``loaded``'s tokenizer."""
        from advisor.models.data import eval_windows, load_corpus

        return eval_windows(loaded.tokenizer, load_corpus(self.eval), self.seq_len, self.max_windows,
                            max_context=loaded.adapter.max_context, bos=self.bos, vocab_size=model_vocab_size(loaded))

    def calib_windows(self, loaded, exclude=None):
        """The quantization calibration windows (disjoint from ``exclude``, the evaluation windows)."""
        from advisor.models.data import calibration_windows, load_corpus

        return calibration_windows(loaded.tokenizer, load_corpus(self.calib), self.n_calib, self.calibration_seq_len,
                                   seed=self.seed, exclude=exclude, max_context=loaded.adapter.max_context,
                                   bos=self.bos, vocab_size=model_vocab_size(loaded))

    def probe_windows(self, loaded, exclude=None):
        """The landscape probes' own small windows (``probes.DEFAULT_N_CALIB`` x ``DEFAULT_CALIB_SEQ_LEN``)
        from the calibration corpus, under the same seed and BOS convention."""
        from advisor.models.data import calibration_windows, load_corpus
        from advisor.probes import DEFAULT_CALIB_SEQ_LEN, DEFAULT_N_CALIB

        seq = min(DEFAULT_CALIB_SEQ_LEN, loaded.adapter.max_context or DEFAULT_CALIB_SEQ_LEN)
        return calibration_windows(loaded.tokenizer, load_corpus(self.calib), DEFAULT_N_CALIB, seq, seed=self.seed,
                                   exclude=exclude, max_context=loaded.adapter.max_context, bos=self.bos,
                                   vocab_size=model_vocab_size(loaded))

    def windows(self, loaded):
        """(evaluation, calibration) windows, calibration disjoint from evaluation."""
        ev = self.eval_windows(loaded)
        return ev, self.calib_windows(loaded, exclude=ev)


def model_vocab_size(loaded) -> int | None:
    """The model's embedding rows: a BOS id must be below it to exist."""
    try:
        return int(loaded.model.get_input_embeddings().weight.shape[0])
    except (AttributeError, TypeError):
        return getattr(getattr(loaded.model, "config", None), "vocab_size", None)


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdvisorError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def _optional_int(text: str) -> int | None:
    """``--max-windows all`` means the whole corpus."""
    return None if text.strip().lower() == "all" else int(text)


_optional_int.__name__ = "integer or 'all'"  # argparse names the expected type with it


DEFAULT = Protocol()


def add_protocol_args(p: argparse.ArgumentParser, calib: bool = True) -> None:
    """The protocol options, with the same names, defaults and help on every command that measures.
    ``calib=False`` leaves out the calibration options (``eval`` quantizes nothing)."""
    d = DEFAULT
    p.add_argument("--eval", "--data", dest="eval", default=d.eval,
                   help=f"evaluation corpus (default {d.eval}; see `advisor ls datasets`)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per window (default {d.seq_len})")
    p.add_argument("--max-windows", type=_optional_int, default=d.max_windows,
                   help=f"evaluation windows, the first K of the corpus; 'all' for every window (default {d.max_windows})")
    p.add_argument("--bos", choices=BOS_MODES, default=d.bos,
                   help="beginning-of-sequence token at each window start: auto follows the tokenizer (BOS + "
                        "seq_len-1 text tokens when it adds one), always, or never (the GPTQ papers' protocol); "
                        f"default {d.bos}")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"evaluation windows per forward pass; changes only float rounding (default {d.batch_size})")
    if calib:
        p.add_argument("--calib", default=d.calib,
                       help=f"calibration corpus (default {d.calib}; see `advisor ls datasets`)")
        p.add_argument("--n-calib", type=int, default=d.n_calib, help=f"calibration windows (default {d.n_calib})")
        p.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len,
                       help="tokens per calibration window (default: --seq-len)")
        p.add_argument("--seed", type=int, default=d.seed,
                       help=f"seed of the calibration offsets and every probe (default {d.seed})")
    else:
        p.set_defaults(calib=d.calib, n_calib=d.n_calib, calib_seq_len=d.calib_seq_len, seed=d.seed)


def finite(name: str, value: float | None, *, positive: bool = False) -> float | None:
    """Refuse NaN/Inf (and, with ``positive``, values <= 0) for a numeric option, by name."""
    if value is None:
        return None
    if not math.isfinite(value) or (positive and not value > 0):
        raise AdvisorError(f"{name} must be a finite{' positive' if positive else ''} number, got {value}")
    return value
