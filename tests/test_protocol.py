"""The measurement protocol: one Protocol value, and the beginning-of-sequence convention of its windows."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from advisor.models.data import (BOS_MODES, calibration_windows, eval_windows, load_corpus, resolve_bos,
                                 tokenize)
from advisor.models.errors import AdvisorError, DataError
from advisor.models.evaluate import perplexity
from advisor.protocol import Protocol
from advisor.store import protocol_key, stable_hash
from tests.conftest import PTB, tiny_model

pytestmark = pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")


def fingerprint(windows) -> str:
    return stable_hash(protocol_key(windows.protocol))


def test_modes_are_one_tuple():
    from advisor import protocol

    assert protocol.BOS_MODES == BOS_MODES


def test_without_bos_every_mode_but_always_is_the_gptq_protocol(tiny_tokenizer):
    corpus = load_corpus(f"ptb:{PTB}")
    ids = tokenize(tiny_tokenizer, corpus)
    auto = eval_windows(tiny_tokenizer, corpus, 32, 4, bos="auto")
    never = eval_windows(tiny_tokenizer, corpus, 32, 4, bos="never")
    assert torch.equal(auto.ids, never.ids) and torch.equal(never.ids, ids[:128].view(4, 32))
    assert "bos_token_id" not in auto.protocol and fingerprint(auto) == fingerprint(never)
    with pytest.raises(DataError, match="--bos always: this tokenizer has no beginning-of-sequence token"):
        eval_windows(tiny_tokenizer, corpus, 32, 4, bos="always")


def test_bos_tokenizer_windows_start_with_bos_then_seq_len_minus_one_text_tokens(tiny_bos_tokenizer):
    corpus = load_corpus(f"ptb:{PTB}")
    bos = tiny_bos_tokenizer.bos_token_id
    ids = tokenize(tiny_bos_tokenizer, corpus)
    assert bos not in ids.tolist()  # the corpus is tokenized once, without special tokens
    assert resolve_bos(tiny_bos_tokenizer, "auto") == bos
    assert resolve_bos(tiny_bos_tokenizer, "auto", vocab_size=bos) is None  # an id the model lacks does not exist
    auto = eval_windows(tiny_bos_tokenizer, corpus, 32, 4, bos="auto")
    always = eval_windows(tiny_bos_tokenizer, corpus, 32, 4, bos="always")
    never = eval_windows(tiny_bos_tokenizer, corpus, 32, 4, bos="never")
    assert torch.equal(auto.ids, always.ids) and auto.ids.shape == (4, 32)
    assert (auto.ids[:, 0] == bos).all()
    assert torch.equal(auto.ids[:, 1:], ids[: 4 * 31].view(4, 31))  # consecutive, non-overlapping text
    assert torch.equal(never.ids, ids[:128].view(4, 32)) and not (never.ids == bos).any()
    assert auto.protocol["bos_token_id"] == bos and "bos_token_id" not in never.protocol
    assert fingerprint(auto) == fingerprint(always) != fingerprint(never)
    # calibration: BOS first, drawn after the evaluation region's text tokens
    cal = calibration_windows(tiny_bos_tokenizer, corpus, 3, 32, seed=1, exclude=auto, bos="auto")
    assert (cal.ids[:, 0] == bos).all() and not (cal.ids[:, 1:] == bos).any()
    assert cal.protocol["region_start_token"] == 4 * 31
    cal_never = calibration_windows(tiny_bos_tokenizer, corpus, 3, 32, seed=1, exclude=never, bos="never")
    assert cal_never.protocol["region_start_token"] == 4 * 32 and fingerprint(cal) != fingerprint(cal_never)


def test_bos_position_is_context_not_a_scored_target(tiny_bos_tokenizer):
    corpus = load_corpus(f"ptb:{PTB}")
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tiny_bos_tokenizer))
    for mode in ("auto", "never"):
        w = eval_windows(tiny_bos_tokenizer, corpus, 16, 3, bos=mode)
        r = perplexity(model, w, progress=False)
        assert r.n_tokens == 3 * 15  # the same number of scored text tokens under both conventions
        with torch.no_grad():
            logits = model(w.ids).logits[:, :-1]
        by_hand = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w.ids[:, 1:].reshape(-1)).item()
        assert r.nll == pytest.approx(by_hand, rel=1e-5) and r.ppl == pytest.approx(math.exp(by_hand), rel=1e-5)


def test_protocol_validates_every_field_before_any_work():
    assert Protocol() == Protocol.from_kwargs()
    assert Protocol.from_kwargs(Protocol(seq_len=64), bos="never") == Protocol(seq_len=64, bos="never")
    for bad, match in [({"seq_len": 0}, "--seq-len"), ({"max_windows": 0}, "--max-windows"),
                       ({"n_calib": -1}, "--n-calib"), ({"calib_seq_len": 0}, "--calib-seq-len"),
                       ({"bos": "sometimes"}, "--bos must be one of auto, always, never"),
                       ({"eval": ""}, "--eval"), ({"batch_size": 0}, "--batch-size"), ({"seed": -2}, "--seed"),
                       ({"seq_len": 1.5}, "--seq-len")]:
        with pytest.raises(AdvisorError, match=match):
            Protocol(**bad)
    with pytest.raises(AdvisorError, match="unknown protocol option.*max_window"):
        Protocol.from_kwargs(max_window=3)


def test_the_protocol_cuts_every_window_with_one_convention(tiny_bos_folder):
    from advisor.models.loading import load

    loaded = load(str(tiny_bos_folder))
    bos = loaded.tokenizer.bos_token_id
    p = Protocol(eval=f"ptb:{PTB}", calib=f"ptb:{PTB}", seq_len=32, max_windows=3, n_calib=2)
    ev, cal = p.windows(loaded)
    probe = p.probe_windows(loaded, exclude=ev)
    for w in (ev, cal, probe):
        assert (w.ids[:, 0] == bos).all() and w.protocol["bos_token_id"] == bos
    ev_n, cal_n = Protocol(**dict(p.to_dict(), bos="never")).windows(loaded)
    assert not (ev_n.ids == bos).any() and not (cal_n.ids == bos).any()
