"""The CLI over real (tiny) models: JSON output, registries, and clear errors without tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from advisor.cli import main
from tests.conftest import PTB, WIKITEXT


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_fast_and_lists_commands(tmp_path):
    # heavy libraries stay out of --help
    code = ("import sys, advisor.cli as c; c.build_parser(); "
            "print(any(m in sys.modules for m in ('torch', 'transformers', 'datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.strip() == "False"
    res = subprocess.run([sys.executable, "-m", "advisor.cli", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "eval" in res.stdout and "ls" in res.stdout


MEASURING = {"eval": ["eval", "--model", "m"], "quantize": ["quantize", "--model", "m", "--spec", "rtn:int8"],
             "sweep": ["sweep", "--models", "m"], "predict": ["predict", "--model", "m"],
             "plan": ["plan", "--model", "m"], "recommend": ["recommend", "--model", "m", "--max-ppl-delta", "1"]}


@pytest.mark.parametrize("cmd", sorted(MEASURING))
def test_every_measuring_command_builds_the_one_protocol(cmd):
    """One Protocol, from one set of options: each measuring command's defaults are the API's defaults, and
    every option reaches the Protocol (a non-default value on the command line comes out in it)."""
    from advisor.cli import build_parser
    from advisor.commands._common import protocol_from
    from advisor.protocol import Protocol

    parser = build_parser()
    assert protocol_from(parser.parse_args(MEASURING[cmd])) == Protocol()
    calib = [] if cmd == "eval" else ["--calib", "file:c", "--n-calib", "3", "--calib-seq-len", "64", "--seed", "7"]
    argv = MEASURING[cmd] + ["--data", "file:e", "--seq-len", "128", "--max-windows", "all", "--bos", "never",
                             "--batch-size", "2"] + calib
    got = protocol_from(parser.parse_args(argv))
    want = dict(eval="file:e", seq_len=128, max_windows=None, bos="never", batch_size=2)
    if cmd != "eval":
        want.update(calib="file:c", n_calib=3, calib_seq_len=64, seed=7)
    assert got == Protocol(**want)


def test_every_flag_has_help_showing_its_default():
    import argparse

    from advisor.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = []
    for cmd, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            shows_default = action.default in (None, False, []) or "default" in (action.help or "")
            if not action.help or not shows_default:
                missing.append((cmd, action.option_strings[0]))
    assert not missing


@pytest.mark.parametrize("kind", ["models", "datasets"])
def test_ls(capsys, kind):
    code, out, _ = run_cli(capsys, "ls", kind, "--json")
    assert code == 0
    entries = json.loads(out)
    assert entries and all(isinstance(v, str) and v for v in entries.values())


@pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")
def test_eval_json(capsys, tiny_folder):
    code, out, _ = run_cli(capsys, "eval", "--model", str(tiny_folder), "--data", f"ptb:{PTB}",
                           "--seq-len", "64", "--max-windows", "3", "--json")
    assert code == 0
    result = json.loads(out)
    assert {"ppl", "nll", "n_tokens", "protocol"} <= set(result)
    assert result["n_tokens"] == 3 * 63
    assert result["protocol"]["n_windows"] == 3 and result["protocol"]["dataset"] == "ptb"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "mistral-7"], "unknown model 'mistral-7'"),
    (["eval", "--model", "facebook/opt-125m"], "not in the local Hugging Face cache"),
    (["eval", "--model", "{folder}", "--data", "nosuchset"], "unknown dataset 'nosuchset'"),
    (["eval", "--model", "{folder}", "--data", "file:{short}", "--seq-len", "64"], "fewer than one window"),
    (["eval", "--model", "{folder}", "--data", "file:{short}", "--seq-len", "4096"], "beyond the model's context"),
    (["eval", "--model", "{folder}", "--data", "file:{short}", "--dtype", "float13"], "unknown dtype 'float13'"),
])
def test_bad_input_gives_clear_error_and_nonzero_exit(capsys, tiny_folder, tmp_path, argv, message):
    short = tmp_path / "short.txt"
    short.write_text("only a handful of tokens here")
    argv = [a.format(folder=tiny_folder, short=short) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    assert message in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.skipif(not WIKITEXT.exists(), reason="needs ../shared")
def test_unknown_command_exits_nonzero(tmp_path):
    res = subprocess.run([sys.executable, "-m", "advisor.cli", "frobnicate"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode != 0 and "invalid choice" in res.stderr
