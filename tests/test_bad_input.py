"""Bad input over the CLI: each case exits non-zero with one clear `error:` line, never a traceback."""
from __future__ import annotations

import os

import pytest

from advisor.cli import main
from tests.conftest import PTB

pytestmark = pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")


def run_cli(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _q(folder, *extra):
    return ["quantize", "--model", str(folder), "--calib", f"file:{PTB}", "--eval", f"file:{PTB}", "--seq-len", "32",
            "--max-windows", "2", "--n-calib", "2", *extra]


CASES = {
    "misspelled method": (lambda f, t: _q(f, "--spec", "gtpq:int4:g16"), "unknown method 'gtpq'"),
    "unknown dtype": (lambda f, t: _q(f, "--spec", "rtn:int5:g16"), "int5"),
    "malformed spec": (lambda f, t: _q(f, "--spec", "rtn"), "spec"),
    "group not dividing": (lambda f, t: _q(f, "--spec", "rtn:mxfp4:g64"), "mxfp4"),
    "truncated gguf": (lambda f, t: ["eval", "--model", str(t / "broken.gguf")], "could not load model"),
    "zero budget": (lambda f, t: ["recommend", "--model", str(f), "--max-ppl-delta", "0", "--calib", f"file:{PTB}",
                                  "--eval", f"file:{PTB}", "--seq-len", "32", "--max-windows", "2",
                                  "--store", str(t / "s.sqlite")], "positive"),
    "nan budget": (lambda f, t: ["recommend", "--model", str(f), "--max-ppl-delta", "nan", "--calib", f"file:{PTB}",
                                 "--eval", f"file:{PTB}", "--seq-len", "32", "--store", str(t / "s.sqlite")], "positive"),
    "ratio below one": (lambda f, t: ["recommend", "--model", str(f), "--max-ppl-ratio", "0.9", "--calib", f"file:{PTB}",
                                      "--eval", f"file:{PTB}", "--seq-len", "32", "--store", str(t / "s.sqlite")],
                        "above 1"),
    "corrupted store": (lambda f, t: ["sweep", "--models", str(f), "--specs", "rtn:int4:g16", "--store",
                                      str(t / "corrupt.sqlite"), "--no-probes"], "corrupted"),
    "unknown sweep spec": (lambda f, t: ["sweep", "--models", str(f), "--specs", "rtn:int4:g16", "bogus:int4",
                                         "--store", str(t / "s2.sqlite"), "--no-probes"], "unknown method 'bogus'"),
    "read-only output": (lambda f, t: _q(f, "--spec", "rtn:int4:g16", "--out", str(t / "ro" / "model")),
                         "not writable"),
    "a file in the way of the output": (lambda f, t: _q(f, "--spec", "rtn:int4:g16", "--out",
                                                        str(t / "afile" / "model")), "not writable"),
    "negative memory budget": (lambda f, t: ["plan", "--model", str(f), "--max-gb", "-1"], "positive"),
    "zero memory for recommend": (lambda f, t: ["recommend", "--model", str(f), "--max-ppl-delta", "1",
                                                "--max-bytes", "0"], "--max-bytes must be a finite positive number"),
    "plan confidence of 1": (lambda f, t: ["plan", "--model", str(f), "--max-gb", "1", "--confidence", "1"],
                             "--confidence must be in [0.5, 1)"),
    "plan csv under a file": (lambda f, t: ["plan", "--model", str(f), "--max-gb", "1", "--csv",
                                            str(t / "afile" / "plan.csv")], "choose another --csv"),
    "missing runs file": (lambda f, t: ["fit", "--runs", str(t / "nope.csv")], "not found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(capsys, tiny_folder, tmp_path, case):
    build, message = CASES[case]
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "corrupt.sqlite").write_bytes(b"garbage, not sqlite" * 64)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        code, out, err = run_cli(capsys, build(tiny_folder, tmp_path))
    finally:
        os.chmod(ro, 0o700)
    if case == "read-only output" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    assert code != 0, out
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    assert message in last, last


def test_full_disk_while_saving_leaves_nothing_behind(tiny_folder, tmp_path):
    """A write that fails mid-file (here: a file-size limit, the same EFBIG/ENOSPC path as a full disk)
    gives one clear error line and leaves neither a partial model folder nor temporary files."""
    import resource
    import signal
    import subprocess
    import sys

    limit = (tiny_folder / "model.safetensors").stat().st_size // 4  # the weights cannot be written whole

    def cap_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write returns EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "advisor.cli", *_q(tiny_folder, "--spec", "rtn:int8", "--out", str(out / "model"))]
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    # First without the limit: numba writes its compiled-kernel cache on first use, and that write would
    # fail first (a full disk breaks numba's cache too; the point here is the model save).
    warm = [*argv[:-1], str(tmp_path / "warm" / "model")]
    assert subprocess.run(warm, capture_output=True, env=env, timeout=300, cwd=tmp_path).returncode == 0
    r = subprocess.run(argv, capture_output=True, text=True, preexec_fn=cap_file_size, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode != 0, r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "could not write --out" in last and "nothing of this write was left behind" in last, last
    assert not (out / "model").exists()
    assert [p.name for p in out.iterdir()] == [] if out.exists() else True
