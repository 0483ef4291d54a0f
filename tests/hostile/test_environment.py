"""Hostile specs, options and environments: one clear `error:` line naming the culprit, before any model loads.

An absurd group size in a spec, an infinite memory budget, a device this build does not have, a file
that is not UTF-8, an ADVISOR_HOME that is a file, sits under a file or cannot be written, and a model
folder without a tokenizer. Each runs through the CLI as a user would meet it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from advisor.cli import main
from tests.conftest import PTB

NEVER = "zoo:never-loaded"  # validation must refuse before this name is looked up
HUGE = "g99999999999999999999"


def _one_error(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0, out
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("argv", [
    ["quantize", "--model", NEVER, "--spec", f"rtn:int4:{HUGE}"],
    ["quantize", "--model", NEVER, "--spec", f"gptq:int4:{HUGE}:asym", "--format", "gguf", "--out", "x.gguf"],
    ["predict", "--model", NEVER, "--spec", f"rtn:int4:{HUGE}"],
    ["sweep", "--models", NEVER, "--specs", f"rtn:int8:{HUGE}", "--no-probes"],
    ["quantize", "--model", NEVER, "--spec", "rtn:int4:g" + "9" * 5000],  # beyond Python's int() digit limit
])
def test_absurd_group_size_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    line = _one_error(capsys, argv + (["--store", str(tmp_path / "s.sqlite")] if argv[0] == "sweep" else []))
    assert "group size" in line and "at most 1048576" in line and "never-loaded" not in line
    assert len(line) < 400
    assert list(tmp_path.iterdir()) == []


def test_group_size_bound_in_the_spec_api():
    from advisor.quantizers import QuantSpec
    from advisor.quantizers.spec import MAX_GROUP_SIZE

    assert QuantSpec.parse(f"rtn:int4:g{MAX_GROUP_SIZE}").group_size == MAX_GROUP_SIZE
    for text in (f"rtn:int4:g{MAX_GROUP_SIZE + 1}", f"rtn:int4:{HUGE}"):
        with pytest.raises(ValueError, match="beyond any layer width"):
            QuantSpec.parse(text)
    with pytest.raises(ValueError, match="beyond any layer width"):
        QuantSpec("rtn", "int4", 10 ** 20)


@pytest.mark.parametrize("argv", [
    ["plan", "--model", NEVER, "--max-gb", "inf"],
    ["recommend", "--model", NEVER, "--max-ppl-delta", "1", "--max-gb", "inf"],
    ["recommend", "--model", NEVER, "--max-ppl-delta", "1", "--max-gb=-inf"],
])
def test_infinite_memory_budget_is_refused(capsys, argv):
    line = _one_error(capsys, argv)
    assert "--max-gb must be a finite positive number" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this build has a CUDA GPU")
@pytest.mark.parametrize("command", [["eval"], ["quantize", "--spec", "rtn:int8"], ["probe"],
                                     ["plan", "--max-gb", "1"], ["recommend", "--max-ppl-delta", "1"]])
def test_device_cuda_on_a_cpu_build(capsys, tiny_folder, command, tmp_path):
    argv = [command[0], "--model", str(tiny_folder), *command[1:], "--device", "cuda"]
    if command[0] != "probe":
        argv += ["--seq-len", "16", "--max-windows", "1"]
    if command[0] in ("plan", "recommend", "probe"):
        argv += ["--store", str(tmp_path / "s.sqlite")]
    line = _one_error(capsys, argv)
    assert "--device cuda" in line and "no CUDA GPU" in line and "--device cpu" in line


@pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")
def test_a_corpus_file_that_is_not_utf8_is_named(capsys, tiny_folder, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait, d\xe9j\xe0 vu\n".encode("latin-1") * 200)
    line = _one_error(capsys, ["eval", "--model", str(tiny_folder), "--eval", f"file:{bad}", "--seq-len", "16",
                               "--max-windows", "1"])
    assert str(bad) in line and "UTF-8" in line.upper()


def test_a_config_json_that_is_not_utf8_is_named(capsys, tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_bytes(text.replace('"llama"', '"llam\xe9"').encode("latin-1"))
    line = _one_error(capsys, ["eval", "--model", str(folder), "--seq-len", "16", "--max-windows", "1"])
    assert "config.json" in line and "utf-8" in line.lower()


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: chmod for a normal user; /sys (a read-only mount) for root."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        return ro
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):
        try:
            (candidate / ".advisor-write-test").touch()
        except OSError:
            return candidate
        (candidate / ".advisor-write-test").unlink()
    pytest.skip("no read-only folder for root here")


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only", "under read-only"])
def test_a_bad_advisor_home_is_named(capsys, tmp_path, monkeypatch, case):
    (tmp_path / "afile").write_text("not a folder")
    home = {"a file": lambda: tmp_path / "afile",
            "under a file": lambda: tmp_path / "afile" / "home",
            "read-only": lambda: _read_only_folder(tmp_path),
            "under read-only": lambda: _read_only_folder(tmp_path) / "advisor-home"}[case]()
    monkeypatch.setenv("ADVISOR_HOME", str(home))
    try:
        # the default store lives in ADVISOR_HOME; zoo:default is built there
        line = _one_error(capsys, ["predict", "--model", "zoo:default", "--seq-len", "16", "--max-windows", "1"])
    finally:
        if (tmp_path / "ro").exists():
            os.chmod(tmp_path / "ro", 0o700)
    assert f"ADVISOR_HOME={home}" in line and "set ADVISOR_HOME to a writable folder" in line
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_model_folder_without_a_tokenizer(capsys, tiny_folder, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_folder / name, folder / name)
    line = _one_error(capsys, ["eval", "--model", str(folder), "--seq-len", "16", "--max-windows", "1"])
    assert str(folder) in line and "tokenizer" in line and "sentencepiece" not in line.lower()


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_tokenizer_file_that_is_not_utf8_is_named(capsys, tiny_folder, tmp_path, name):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    raw = (folder / name).read_bytes()
    (folder / name).write_bytes(raw[:-2] + b"\xe9\xff" + raw[-2:])
    line = _one_error(capsys, ["eval", "--model", str(folder), "--seq-len", "16", "--max-windows", "1"])
    assert name in line
