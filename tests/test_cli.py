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


def test_sweep_predict_and_recommend_share_the_protocol_defaults():
    """A prediction is only as good as the match between its probes and the runs it was fitted on: the three
    commands default to one protocol (predict once lacked --n-calib and could not match recommend)."""
    import inspect

    from advisor.api import prepare
    from advisor.cli import build_parser

    keys = ["calib", "eval", "seq_len", "max_windows", "n_calib", "seed"]
    parser = build_parser()
    argv = {"sweep": ["sweep", "--models", "m"], "predict": ["predict", "--model", "m"],
            "recommend": ["recommend", "--model", "m", "--max-ppl-delta", "1"]}
    seen = {cmd: {k: getattr(parser.parse_args(a), k) for k in keys} for cmd, a in argv.items()}
    api = {k: v.default for k, v in inspect.signature(prepare).parameters.items() if k in keys}
    assert seen["sweep"] == seen["predict"] == seen["recommend"] == api
    from advisor.commands._common import protocol_kwargs

    passed = protocol_kwargs(parser.parse_args(argv["predict"]))
    assert set(keys) <= set(passed) <= set(inspect.signature(prepare).parameters)


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
