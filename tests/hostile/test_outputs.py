"""Hostile outputs and checkpoints: each case is built in tmp_path; every refusal exits non-zero with one
``error:`` line naming the user's path, no traceback, and no pre-existing file changed."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch


def _snapshot(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[p] = (stat.S_IFMT(st.st_mode), data)
    return out


def _run(capsys, *argv):
    from advisor.cli import main

    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _refused(code, err, culprit):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err  # progress bars may come before it
    assert "Traceback" not in err and ".tmp-" not in err
    assert culprit in lines[0], (culprit, lines[0])


def _quantize(folder, out, *extra):
    return ["quantize", "--model", str(folder), "--spec", "rtn:int8", "--max-windows", "1", "--seq-len", "16",
            "--n-calib", "1", "--out", str(out), *extra]


def test_folder_with_user_files_is_refused(tmp_path, tiny_folder, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    before = _snapshot(tmp_path)
    code, _, err = _run(capsys, *_quantize(tiny_folder, precious))
    _refused(code, err, str(precious))
    assert "--force" in err
    assert _snapshot(tmp_path) == before


def test_current_folder_is_refused(tmp_path, tiny_folder, capsys, monkeypatch):
    (tmp_path / "notes.md").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = _run(capsys, *_quantize(tiny_folder, "."))
    _refused(code, err, "--out .")
    assert _snapshot(tmp_path) == before


def test_existing_file_is_refused(tmp_path, tiny_folder, capsys):
    afile = tmp_path / "afile"
    afile.write_text("data")
    before = _snapshot(tmp_path)
    code, _, err = _run(capsys, *_quantize(tiny_folder, afile))
    _refused(code, err, str(afile))
    assert _snapshot(tmp_path) == before and not (tmp_path / ".afile.old").exists()


def test_existing_file_is_refused_as_gguf_target(tmp_path, tiny_folder, capsys):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"GGUF not ours")
    before = _snapshot(tmp_path)
    code, _, err = _run(capsys, *_quantize(tiny_folder, target, "--format", "gguf"))
    _refused(code, err, str(target))
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "symlink", "device"])
def test_special_files_are_never_followed_or_moved(tmp_path, tiny_folder, capsys, kind):
    target = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":  # a character device like /dev/null (only root may create one)
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    else:
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "keep.txt").write_text("k")
        target.symlink_to(tmp_path / "real")
    before = _snapshot(tmp_path)
    for force in ([], ["--force"]):
        code, _, err = _run(capsys, *_quantize(tiny_folder, target, *force))
        _refused(code, err, str(target))
    assert _snapshot(tmp_path) == before


def test_empty_out_and_unwritable_parent_are_refused_before_work(tmp_path, tiny_folder, capsys):
    code, out, err = _run(capsys, *_quantize(tiny_folder, ""))
    _refused(code, err, "--out")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder would be")
    code, out, err = _run(capsys, *_quantize(tiny_folder, blocker / "sub" / "q"))
    _refused(code, err, str(blocker / "sub" / "q"))
    assert blocker.read_text() == "a file where a folder would be"


def test_force_keeps_user_files_and_replaces_only_advisors(tmp_path, tiny_folder, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    code, _, err = _run(capsys, *_quantize(tiny_folder, precious, "--force"))
    assert code == 0, err
    assert (precious / "thesis.txt").read_text() == "x"
    manifest = json.loads((precious / "advisor-manifest.json").read_text())
    assert "thesis.txt" not in manifest["files"] and "advisor-model.safetensors" in manifest["files"]
    code, _, err = _run(capsys, *_quantize(tiny_folder, precious, "--force"))  # again: replaces its own files
    assert code == 0, err
    assert (precious / "thesis.txt").read_text() == "x"
    # a user's file with a name advisor writes is never overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{\"mine\": 1}")
    code, _, err = _run(capsys, *_quantize(tiny_folder, other, "--force"))
    _refused(code, err, "config.json")
    assert (other / "config.json").read_text() == "{\"mine\": 1}" and len(list(other.iterdir())) == 1


def test_rewrite_of_advisor_folder_and_leftovers_are_cleaned(tmp_path, tiny_folder, capsys):
    q = tmp_path / "q"
    assert _run(capsys, *_quantize(tiny_folder, q))[0] == 0
    # leftovers of an interrupted write: a dead process's temporary and an old copy
    stale = tmp_path / ".q.tmp-999999999-dead"
    stale.mkdir()
    (stale / "advisor-model.safetensors").write_bytes(b"partial")
    old = tmp_path / ".q.old"
    old.mkdir()
    (old / "advisor-manifest.json").write_text(json.dumps({"advisor_output": "native", "files": {}}))
    code, _, err = _run(capsys, *_quantize(tiny_folder, q))
    assert code == 0, err
    assert not stale.exists() and not old.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_failed_write_leaves_nothing_and_keeps_the_previous_output(tmp_path, tiny_folder, capsys, monkeypatch):
    q = tmp_path / "q"
    assert _run(capsys, *_quantize(tiny_folder, q))[0] == 0
    before = _snapshot(tmp_path)
    import advisor.kernels.io as kio

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kio, "_atomic_save", full_disk)
    code, _, err = _run(capsys, *_quantize(tiny_folder, q))
    _refused(code, err, str(q))
    assert "No space left" in err
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------ checkpoints that do not match
def _hf_folder(tmp_path, tiny_folder, name):
    import shutil

    dst = tmp_path / name
    shutil.copytree(tiny_folder, dst)
    return dst


def _edit_safetensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["missing", "unexpected", "packed", "wrong shape"])
def test_checkpoint_tensors_must_match_the_architecture(tmp_path, tiny_folder, capsys, case):
    folder = _hf_folder(tmp_path, tiny_folder, case)
    weights = folder / "model.safetensors"
    if case == "missing":
        _edit_safetensors(weights, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
        culprit = "model.layers.0.mlp.up_proj.weight"
    elif case == "unexpected":
        _edit_safetensors(weights, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
        culprit = "model.layers.0.extra.weight"
    elif case == "wrong shape":  # transformers would point to "the above report", which is not shown
        _edit_safetensors(weights, lambda t: t.update({"model.layers.0.mlp.up_proj.weight":
                                                       t["model.layers.0.mlp.up_proj.weight"][:-1].clone()}))
        culprit = "1 wrong-shape tensor(s) (model.layers.0.mlp.up_proj.weight)"
    else:  # a folder holding packed tensors under the float names' modules
        def pack(t):
            w = t.pop("model.layers.0.mlp.up_proj.weight")
            t["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(w.shape[0], w.shape[1] // 2, dtype=torch.uint8)
            t["model.layers.0.mlp.up_proj.scales"] = torch.ones(w.shape[0], 1, dtype=torch.float16)
        _edit_safetensors(weights, pack)
        culprit = "packed quantized tensors"
    before = _snapshot(tmp_path)
    code, _, err = _run(capsys, "eval", "--model", str(folder), "--max-windows", "1", "--seq-len", "16")
    _refused(code, err, culprit)
    assert str(folder) in err and "above report" not in err
    assert _snapshot(tmp_path) == before


def test_native_folder_changed_after_saving_is_refused(tmp_path, tiny_folder, capsys):
    q = tmp_path / "q"
    assert _run(capsys, *_quantize(tiny_folder, q))[0] == 0
    with open(q / "advisor-model.safetensors", "r+b") as f:
        f.truncate(100)
    code, _, err = _run(capsys, "eval", "--model", str(q), "--max-windows", "1", "--seq-len", "16")
    _refused(code, err, "advisor-model.safetensors")


def test_native_weights_missing_a_tensor_are_refused(tmp_path, tiny_folder, capsys):
    from advisor.kernels.io import load_quantized_file, save_quantized

    q = tmp_path / "q"
    assert _run(capsys, *_quantize(tiny_folder, q))[0] == 0
    path = q / "advisor-model.safetensors"
    modules, extra, meta = load_quantized_file(str(path))
    extra.pop("model.norm.weight")
    save_quantized(str(path), modules, meta, extra)
    manifest = json.loads((q / "advisor-manifest.json").read_text())  # keep the manifest consistent
    manifest["files"]["advisor-model.safetensors"] = path.stat().st_size
    (q / "advisor-manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "eval", "--model", str(q), "--max-windows", "1", "--seq-len", "16")
    _refused(code, err, "model.norm.weight")


# ------------------------------------------------------------------------------- recommend --out
def _recommend(folder, out, tmp_path, *extra):
    return ["recommend", "--model", str(folder), "--max-ppl-ratio", "100", "--methods", "rtn", "--max-attempts", "1",
            "--no-explore", "--max-windows", "1", "--seq-len", "16", "--n-calib", "1", "--store",
            str(tmp_path / "s.sqlite"), "--out", str(out), *extra]


def test_recommend_out_refuses_a_users_folder_unless_forced(tmp_path, tiny_folder, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    (precious / "figures").mkdir()
    (precious / "figures" / "f.png").write_bytes(b"png")
    before = _snapshot(precious)
    code, _, err = _run(capsys, *_recommend(tiny_folder, precious, tmp_path))
    _refused(code, err, str(precious))
    assert "--force" in err and _snapshot(precious) == before
    # --force: advisor adds its report and model, the user's files stay as they were
    code, _, err = _run(capsys, *_recommend(tiny_folder, precious, tmp_path, "--force"))
    assert code == 0, err
    after = _snapshot(precious)
    assert all(after[p] == v for p, v in before.items())
    manifest = json.loads((precious / "advisor-manifest.json").read_text())
    assert set(manifest["files"]) == {"recommendation.json", "report.md", "dppl_vs_bits.png"}
    assert manifest["folders"] == ["model"] and (precious / "model" / "advisor-manifest.json").is_file()
    # the folder is advisor's now: a second run needs no --force and still keeps the user's files
    code, _, err = _run(capsys, *_recommend(tiny_folder, precious, tmp_path))
    assert code == 0, err
    assert all(_snapshot(precious)[p] == v for p, v in before.items())


@pytest.mark.parametrize("name", ["report.md", "recommendation.json", "model"])
def test_recommend_force_never_replaces_a_users_file_of_a_name_it_writes(tmp_path, tiny_folder, capsys, name):
    mine = tmp_path / "mine"
    mine.mkdir()
    if name == "model":
        (mine / "model").mkdir()
        (mine / "model" / "weights.bin").write_bytes(b"mine")
    else:
        (mine / name).write_text("my own " + name)
    before = _snapshot(tmp_path)
    code, _, err = _run(capsys, *_recommend(tiny_folder, mine, tmp_path, "--force"))
    _refused(code, err, name)
    assert _snapshot(tmp_path) == before  # refused before any work: not even the store was created


def test_recommend_out_current_folder_and_file_are_refused(tmp_path, tiny_folder, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("mine")
    (tmp_path / "afile").write_text("data")
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    code, _, err = _run(capsys, *_recommend(tiny_folder, ".", tmp_path))
    _refused(code, err, "--out .")
    code, _, err = _run(capsys, *_recommend(tiny_folder, tmp_path / "afile", tmp_path))
    _refused(code, err, str(tmp_path / "afile"))
    assert _snapshot(tmp_path) == before
