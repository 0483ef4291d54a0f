"""Validate, then work: every bad option value is one clear `error:` line before any model loads."""
from __future__ import annotations

import pytest

from advisor.cli import main

M = ["--model", "zoo:no-such-model-is-loaded"]  # never reached: validation comes first


@pytest.mark.parametrize("argv, message", [
    (["plan", *M, "--top", "-1"], "--top must be at least 1"),
    (["plan", *M, "--methods", ","], "--methods ',' names nothing"),
    (["recommend", *M, "--max-ppl-delta", "1", "--dtypes", " , "], "--dtypes"),
    (["plan", *M, "--csv", ""], "--csv needs a file name"),
    (["recommend", *M, "--max-ppl-delta", "1", "--out", ""], "error: --out "),
    (["quantize", *M, "--spec", "rtn:int8", "--out", ""], "error: --out "),
    (["quantize", *M, "--spec", "rtn:int8", "--calib-seq-len", "0"], "--calib-seq-len must be an integer of at least 2"),
    (["eval", *M, "--max-windows", "0"], "--max-windows must be an integer of at least 1"),
    (["eval", *M, "--seq-len", "0"], "--seq-len must be an integer of at least 2"),
    (["quantize", *M, "--spec", "rtn:int8", "--n-calib", "-3"], "--n-calib must be an integer of at least 1"),
    (["eval", *M, "--batch-size", "0"], "--batch-size must be an integer of at least 1"),
    (["plan", *M, "--max-gb", "inf"], "--max-gb must be a finite positive number"),
    (["plan", *M, "--max-gb", "nan"], "--max-gb must be a finite positive number"),
    (["fit", "--report", "--confidence", "2"], "--confidence must be in [0.5, 1)"),
])
def test_bad_option_values_are_refused_before_any_work(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0 and message in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err and "internal error" not in err
