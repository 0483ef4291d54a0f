from __future__ import annotations

import pytest

from advisor.models.data import (DATASETS, calibration_windows, eval_windows, load_corpus, stdlib_files)
from advisor.models.errors import DataError
from tests.conftest import PTB, WIKITEXT


def test_stdlib_parts_are_disjoint_and_deterministic():
    parts = {p: set(stdlib_files(p)) for p in ("train", "calib", "eval")}
    assert all(parts.values())
    assert not parts["train"] & parts["calib"] and not parts["train"] & parts["eval"]
    assert not parts["calib"] & parts["eval"]
    assert set(stdlib_files("eval")) == parts["eval"]
    c1, c2 = load_corpus("stdlib-code"), load_corpus("stdlib-code:eval")
    assert c1.protocol["text_sha256"] == c2.protocol["text_sha256"]
    assert c1.protocol["split"] == "eval"


@pytest.mark.skipif(not WIKITEXT.exists(), reason="needs ../shared")
def test_wikitext_local_copy_reproduces_hub_rows_joined():
    corpus = load_corpus(f"wikitext2:{WIKITEXT}")
    assert corpus.protocol["format"] == "hub-rows-joined"
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = ["" if line.strip() == "" else line for line in lines]
    assert corpus.text == "\n\n".join(rows)
    plain = load_corpus(f"file:{WIKITEXT}")
    assert plain.protocol["format"] == "plain-text"
    assert plain.protocol["text_sha256"] != corpus.protocol["text_sha256"]


def test_unknown_dataset_and_missing_file():
    with pytest.raises(DataError, match="unknown dataset 'wikitext3'.*wikitext2"):
        load_corpus("wikitext3")
    with pytest.raises(DataError, match="not found"):
        load_corpus("file:/nonexistent/corpus.txt")
    assert set(DATASETS) >= {"wikitext2", "ptb", "c4", "file", "stdlib-code"}


def test_empty_corpus(tmp_path):
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(f"file:{tmp_path / 'e.txt'}")


@pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")
def test_windows_protocol_and_disjoint_calibration(tiny_tokenizer):
    corpus = load_corpus(f"ptb:{PTB}")
    ev = eval_windows(tiny_tokenizer, corpus, seq_len=64, max_windows=5)
    assert ev.ids.shape == (5, 64)
    for key in ("dataset", "split", "text_sha256", "tokenizer", "seq_len", "n_windows"):
        assert key in ev.protocol
    cal = calibration_windows(tiny_tokenizer, corpus, n_windows=4, seq_len=64, seed=1, exclude=ev)
    assert cal.protocol["region_start_token"] == 5 * 64
    again = calibration_windows(tiny_tokenizer, corpus, n_windows=4, seq_len=64, seed=1, exclude=ev)
    assert (cal.ids == again.ids).all()
    # no calibration window reproduces an evaluation window's tokens
    ev_rows = {tuple(r.tolist()) for r in ev.ids}
    assert not any(tuple(r.tolist()) in ev_rows for r in cal.ids)


def test_too_short_corpus_and_context(tmp_path, tiny_tokenizer):
    (tmp_path / "short.txt").write_text("a few words only")
    corpus = load_corpus(f"file:{tmp_path / 'short.txt'}")
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(tiny_tokenizer, corpus, seq_len=512)
    with pytest.raises(DataError, match="beyond the model's context of 128"):
        eval_windows(tiny_tokenizer, corpus, seq_len=256, max_context=128)
