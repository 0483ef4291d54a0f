"""Hostile model files: bounded work before anything is allocated, regular files only, clear errors.

Each case builds its file in a temporary folder, runs the real code path (the CLI where a user would
meet it), and checks the exit code, a one-line ``error:`` naming the culprit, no traceback and no
``internal error``, and that no file of the folder changed. A hypothesis fuzz throws arbitrary bytes
and adversarial headers at the safetensors-header and GGUF-metadata parsers, bounded in time and memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor.cli import main
from advisor.models.errors import AdvisorError
from advisor.models.memory import gguf_numel, model_numel, read_safetensors_header, safetensors_numel


@pytest.fixture(autouse=True)
def _deadline():
    """A hang is a failure, not a stuck test run."""
    def timeout(*_):
        raise TimeoutError("hung for 60 s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = "special"
    return out


def _cli_error(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and "internal error" not in err, err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, err
    return code, next(ln for ln in lines if ln.startswith("error:"))


def _eval(folder_or_file) -> list[str]:
    return ["eval", "--model", str(folder_or_file), "--seq-len", "16", "--max-windows", "1", "--device", "cpu"]


def _gguf_header(n_tensors: int, kvs: bytes, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs


def _kv_array(key: bytes, etype: int, count: int) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, etype, count)


def test_gguf_array_claiming_2_to_the_40_items_is_refused_at_once(tmp_path, capsys):
    data = _gguf_header(0, _kv_array(b"general", 8, 2**40), 1)
    assert len(data) == 55
    path = tmp_path / "evil.gguf"
    path.write_bytes(data)
    before = _snapshot(tmp_path)
    tracemalloc.start()
    with pytest.raises(AdvisorError, match=r"evil\.gguf is not a valid GGUF file.*array of 1099511627776 items"):
        gguf_numel(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20
    code, line = _cli_error(capsys, _eval(path))
    assert code == 1 and "evil.gguf" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("etype", [4, 10, 9])  # u32, u64, nested arrays
def test_gguf_counts_beyond_the_file_are_refused(tmp_path, etype):
    path = tmp_path / "big.gguf"
    path.write_bytes(_gguf_header(0, _kv_array(b"k", etype, 2**62), 1))
    with pytest.raises(AdvisorError, match="past the end of the file"):
        gguf_numel(path)
    path.write_bytes(_gguf_header(2**60, b"", 0))
    with pytest.raises(AdvisorError, match="tensors claims"):
        gguf_numel(path)
    path.write_bytes(b"GGUF" + struct.pack("<I", 99) + bytes(16))
    with pytest.raises(AdvisorError, match="version 99"):
        gguf_numel(path)


def test_gguf_parser_counts_a_real_file(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "ok.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("some.floats", [1.0, 2.0])
    w.add_tensor("a", np.zeros((3, 5), dtype=np.float32))
    w.add_tensor("b", np.zeros((7,), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_numel(path) == 22


def test_config_claiming_100000_layers_beside_2_layer_weights_is_refused(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "liar"
    shutil.copytree(tiny_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 100000
    (folder / "config.json").write_text(json.dumps(cfg))
    before = _snapshot(folder)
    with pytest.raises(AdvisorError, match=r"config\.json says the model has 100000 layers but its safetensors "
                                           r"weights hold 2"):
        model_numel("folder", folder)
    code, line = _cli_error(capsys, _eval(folder))
    assert code == 1 and "config.json" in line and "100000" in line
    assert _snapshot(folder) == before


@pytest.mark.parametrize("value", [0, -3, "many", 10**9, True])
def test_implausible_layer_counts_are_refused(tiny_folder, tmp_path, value):
    folder = tmp_path / "odd"
    shutil.copytree(tiny_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdvisorError, match="not a plausible number of layers"):
        model_numel("folder", folder)


def test_safetensors_fifo_does_not_hang(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "fifo"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    with pytest.raises(AdvisorError, match="model.safetensors is not a regular file"):
        safetensors_numel(folder / "model.safetensors")
    code, line = _cli_error(capsys, _eval(folder))
    assert code == 1 and "model.safetensors" in line and "not a regular file" in line


def test_fifo_anywhere_in_the_model_folder_is_refused(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "fifo2"
    shutil.copytree(tiny_folder, folder)
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    code, line = _cli_error(capsys, _eval(folder))
    assert code == 1 and "tokenizer.json" in line and "not a regular file" in line


def _safetensors(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


ODD_HEADERS = {
    "no shape": ({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4, "has no valid shape"),
    "negative dim": ({"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 4]}}, b"\0" * 4, "no valid shape"),
    "float dim": ({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4, "no valid shape"),
    "unknown dtype": ({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "has dtype 'Q4'"),
    "offsets past the end": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4,
                             "outside the file"),
    "size mismatch": ({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4]}}, b"\0" * 4,
                      "offsets span 4"),
    "list header": ([1, 2, 3], b"", "header is a JSON list"),
    "entry not an object": ({"w": 7}, b"", "is not an object"),
    "not json": (b"{nope", b"", "header is not JSON"),
    "not utf-8": (b"\xe9\xff", b"", "header is not JSON"),
}


@pytest.mark.parametrize("case", sorted(ODD_HEADERS))
def test_odd_safetensors_headers_give_a_clear_error(tiny_folder, tmp_path, capsys, case):
    header, data, message = ODD_HEADERS[case]
    folder = tmp_path / "odd"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").write_bytes(_safetensors(header, data))
    before = _snapshot(folder)
    with pytest.raises(AdvisorError, match=message):
        read_safetensors_header(folder / "model.safetensors")
    code, line = _cli_error(capsys, _eval(folder))
    assert code == 1 and "model.safetensors is not a valid safetensors file" in line
    assert _snapshot(folder) == before


@pytest.mark.parametrize("raw,message", [(b"", "shorter than the 8-byte"),
                                         (struct.pack("<Q", 2**63) + b"{}", "exceeds the file"),
                                         (struct.pack("<Q", 10) + b"{}", "exceeds the file")])
def test_truncated_safetensors(tmp_path, raw, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    with pytest.raises(AdvisorError, match=message):
        safetensors_numel(path)


# -- fuzz -------------------------------------------------------------------------------------
FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c,
                                                                                                 max_size=4)),
                     max_leaves=12)
_entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "X", 3]),
                                "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=4), _json),
                                "data_offsets": st.one_of(st.lists(st.integers(-5, 2**50), min_size=2, max_size=2),
                                                          _json)})


def _bounded(fn, path: Path) -> None:
    """``fn(path)`` returns a count or raises AdvisorError, within a small memory budget."""
    tracemalloc.start()
    try:
        result = fn(path)
        assert isinstance(result, (int, dict))
    except AdvisorError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 8 << 20, peak


@FUZZ
@given(header=st.one_of(_json, st.dictionaries(st.text(max_size=8), _entry, max_size=4)),
       data=st.binary(max_size=64), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_safetensors_header(tmp_path, header, data, length):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_safetensors(header, data, length))
    _bounded(read_safetensors_header, path)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_fuzz_safetensors_bytes(tmp_path, raw):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    _bounded(safetensors_numel, path)


_count = st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1))
_kv = st.tuples(st.binary(max_size=10), st.integers(0, 14), st.integers(0, 14), _count, st.binary(max_size=24))


@FUZZ
@given(version=st.sampled_from([2, 3, 1, 7]), n_tensors=_count, kvs=st.lists(_kv, max_size=4),
       tail=st.binary(max_size=120))
def test_fuzz_gguf_metadata(tmp_path, version, n_tensors, kvs, tail):
    body = b""
    for key, vtype, etype, count, payload in kvs:
        body += struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype)
        body += struct.pack("<IQ", etype, count) + payload if vtype == 9 else payload
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(_gguf_header(n_tensors, body + tail, len(kvs), version))
    _bounded(gguf_numel, path)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_gguf_bytes(tmp_path, raw):
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(b"GGUF" + raw)
    _bounded(gguf_numel, path)
