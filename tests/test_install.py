"""What a user installs: one import namespace, a console script that works from anywhere, package data in
the wheel. These run the installed distribution, never the checkout's folders by path."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("advisor")


def _outside_env(tmp_path: Path) -> dict:
    """The user's environment with a fresh ADVISOR_HOME and no PYTHONPATH pointing into the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, ADVISOR_HOME=str(tmp_path / "home"))


def test_the_distribution_installs_only_the_advisor_import_name():
    dist = importlib.metadata.distribution("advisor")
    assert dist.read_text("top_level.txt").split() == ["advisor"]
    for f in dist.files:
        top = Path(f).parts[0]
        # dist-info, the console script (../../../bin/advisor), and an editable install's own hooks
        if top.endswith(".dist-info") or top == ".." or top.startswith("__editable__") or top == "__pycache__":
            continue
        assert top == "advisor", f"the distribution installs the top-level name {top!r}"
    finder = [f for f in dist.files if str(f).startswith("__editable___") and str(f).endswith("_finder.py")]
    for f in finder:  # editable install: every mapped package lies under advisor.
        text = Path(f.locate()).read_text()
        mapping = ast.literal_eval(text.split("MAPPING: dict[str, str] = ", 1)[1].split("\n", 1)[0])
        assert mapping and all(n == "advisor" or n.startswith("advisor.") for n in mapping), mapping


def test_the_wheel_holds_one_package_and_its_data(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    src = tmp_path / "src"  # a copy: setuptools writes build/ into the tree it builds
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "__pycache__", "*.egg-info", "runs",
                                                             "out", "demo-report", "benchmarks", "tests", "docs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = tmp_path.glob("advisor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"advisor", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    for needed in ("advisor/data/predictor.json", "advisor/data/runs.csv", "advisor/kernels/cpu.py",
                   "advisor/models/zoo/default/model.safetensors", "advisor/models/zoo/default/tokenizer.json",
                   "advisor/models/zoo/tokenizer/tokenizer.json", "advisor/models/zoo/manifest.json"):
        assert needed in names, f"the wheel lacks {needed}"


def test_other_distributions_keep_their_top_level_names(tmp_path):
    """Hugging Face's ``kernels`` (a transformers dependency) stays importable as ``kernels`` beside ours."""
    code = ("import importlib.util, advisor.kernels\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else '')\n"
            "print(advisor.kernels.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=_outside_env(tmp_path),
                         capture_output=True, text=True).stdout.splitlines()
    theirs, ours = out
    assert Path(ours).resolve() == (ROOT / "kernels" / "__init__.py").resolve() or "site-packages" in ours
    assert theirs != ours
    try:
        hf = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert theirs == "", f"`import kernels` resolves to {theirs} although no `kernels` distribution is installed"
    else:
        assert any(Path(f.locate()).resolve() == Path(theirs).resolve() for f in hf.files), theirs


def test_console_script_recommends_from_outside_the_checkout(tmp_path):
    """The installed ``advisor`` script, run where no checkout folder is on the path, verifies a recommendation."""
    out = tmp_path / "report"
    r = subprocess.run([str(SCRIPT), "recommend", "--model", "zoo:default", "--max-ppl-ratio", "1.02",
                        "--max-windows", "4", "--n-calib", "4", "--out", str(out), "--json"],
                       cwd=tmp_path, env=_outside_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert rec["verified"] is True and rec["measured_ppl_delta"] <= rec["max_ppl_delta"]
    assert (out / "recommendation.json").is_file() and (out / "report.md").is_file()
