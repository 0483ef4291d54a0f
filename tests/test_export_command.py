"""`advisor export` from a saved native folder, and `recommend --verify-export`, on tiny llama and qwen2 models.

`advisor export` must write the very codes the quantize run measured: its files are compared tensor by
tensor with the export `quantize --format` writes from the same run in memory. `--verify-export` loads
the export with transformers (compressed-tensors, GGUF) and must agree with advisor within EXPORT_RTOL;
a damaged export must fail verification with exit 4 and one `error:` line.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from advisor.cli import main
from tests.conftest import PTB
from tests.test_export import TOL, _folder

pytestmark = pytest.mark.skipif(not PTB.exists(), reason="needs ../shared")

PROTOCOL = ["--calib", f"file:{PTB}", "--eval", f"file:{PTB}", "--seq-len", "32", "--max-windows", "2",
            "--n-calib", "2", "--device", "cpu"]


def _json(capsys, argv, code=0):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == code, err
    return json.loads(out)


def _one_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _gguf_tensors(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: bytes(f.parts[f.data[0]]).decode() for k, f in reader.fields.items() if k.startswith("advisor.")}
    return {t.name: (int(t.tensor_type), np.array(t.data).tobytes()) for t in reader.tensors}, fields


@pytest.mark.parametrize("arch,spec,fmt", [("llama", "rtn:int4:g32", "compressed-tensors"),
                                           ("qwen2", "gptq:int4:g16", "compressed-tensors"),
                                           ("qwen2", "rtn:int3:g32", "gptq"),
                                           ("llama", "rtn:int8:g32", "gguf"),
                                           ("mistral", "rtn:int4:g32", "gguf")])
def test_export_writes_the_codes_quantize_measured(tmp_path, tiny_tokenizer, capsys, arch, spec, fmt):
    src = _folder(tmp_path, tiny_tokenizer, arch, num_key_value_heads=4)
    q = _json(capsys, ["quantize", "--model", str(src), "--spec", spec, *PROTOCOL, "--out", str(tmp_path / "native"),
                       "--json"])
    direct_out = tmp_path / ("direct.gguf" if fmt == "gguf" else "direct")
    direct = _json(capsys, ["quantize", "--model", str(src), "--spec", spec, *PROTOCOL, "--format", fmt,
                            "--out", str(direct_out), "--json"])
    assert direct["ppl"] == q["ppl"]  # the same run twice: same codes
    out = tmp_path / ("exported.gguf" if fmt == "gguf" else "exported")
    e = _json(capsys, ["export", "--model", str(tmp_path / "native"), "--format", fmt, "--out", str(out), "--json"])
    assert e["spec"] == spec and e["ppl"] == q["ppl"] and e["protocol_fingerprint"] == q["protocol_fingerprint"]
    if fmt == "gguf":
        got, fields = _gguf_tensors(out)
        want, _ = _gguf_tensors(direct_out)
        assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)
        record = json.loads(fields["advisor.record"])
        assert fields["advisor.spec"] == spec and record["ppl"] == q["ppl"]
        assert record["protocol_fingerprint"] == q["protocol_fingerprint"]
    else:
        got, want = _tensors(out / "model.safetensors"), _tensors(direct_out / "model.safetensors")
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        config = json.loads((out / "config.json").read_text())
        assert config["advisor"]["spec"] == spec and config["advisor"]["ppl"] == q["ppl"]
        assert config["advisor"]["protocol_fingerprint"] == q["protocol_fingerprint"]
        assert config["quantization_config"] == json.loads((direct_out / "config.json").read_text())["quantization_config"]
        manifest = json.loads((out / "advisor-manifest.json").read_text())
        assert manifest["spec"] == spec and manifest["protocol_fingerprint"] == q["protocol_fingerprint"]
    if fmt != "gptq":  # the target's own loader reads the export and measures what advisor measured
        from advisor.models.data import eval_windows, load_corpus
        from advisor.models.evaluate import perplexity
        from advisor.models.export import load_export

        model, _ = load_export(out, fmt)
        windows = eval_windows(tiny_tokenizer, load_corpus(f"file:{PTB}"), 32, 2)
        assert windows.protocol["n_windows"] == q["n_windows"]
        assert perplexity(model, windows, progress=False).ppl == pytest.approx(q["ppl"], rel=TOL)


def test_export_refusals_come_before_loading(tmp_path, tiny_folder, capsys):
    # a float model folder is not an export source
    line = _one_error(capsys, ["export", "--model", str(tiny_folder), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    assert "is not an advisor native folder" in line and str(tiny_folder) in line
    # a spec with no exact GGUF type names the nearest exact one, in export and in quantize --format
    _json(capsys, ["quantize", "--model", str(tiny_folder), "--spec", "rtn:nf4:g16", *PROTOCOL,
                   "--out", str(tmp_path / "nf4"), "--json"])
    line = _one_error(capsys, ["export", "--model", str(tmp_path / "nf4"), "--format", "gguf",
                               "--out", str(tmp_path / "m.gguf")])
    assert "has no exact GGUF type" in line and "rtn:int4:g32" in line
    line = _one_error(capsys, ["quantize", "--model", "zoo:never-loaded", "--spec", "rtn:nf4:g16", "--format", "gguf",
                               "--out", str(tmp_path / "q.gguf")])
    assert "has no exact GGUF type" in line and "rtn:int4:g32" in line
    line = _one_error(capsys, ["export", "--model", str(tmp_path / "nf4"), "--format", "compressed-tensors",
                               "--out", str(tmp_path / "ct")])
    assert "integer grids" in line
    # an existing folder of the user's is refused untouched
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    _json(capsys, ["quantize", "--model", str(tiny_folder), "--spec", "rtn:int8:g32", *PROTOCOL,
                   "--out", str(tmp_path / "int8"), "--json"])
    line = _one_error(capsys, ["export", "--model", str(tmp_path / "int8"), "--format", "compressed-tensors",
                               "--out", str(tmp_path / "mine")])
    assert "advisor did not create" in line and (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.joinpath("mine").iterdir()) == ["notes.txt"]
    assert not (tmp_path / "ct").exists() and not (tmp_path / "m.gguf").exists()


RECOMMEND = ["--max-ppl-ratio", "100", "--methods", "rtn", "--max-attempts", "1", "--no-explore", *PROTOCOL]


@pytest.mark.parametrize("arch,fmt", [("llama", "compressed-tensors"), ("qwen2", "compressed-tensors"),
                                      ("llama", "gguf"), ("mistral", "gguf")])
def test_recommend_verify_export_measures_the_artifact(tmp_path, tiny_tokenizer, capsys, arch, fmt):
    from advisor.models.export import export_refusal
    from advisor.quantizers import QuantSpec

    src = _folder(tmp_path, tiny_tokenizer, arch)
    r = _json(capsys, ["recommend", "--model", str(src), *RECOMMEND, "--store", str(tmp_path / "s.sqlite"),
                       "--verify-export", fmt, "--out", str(tmp_path / "R"), "--json"])
    assert r["verified"] and r["exit_code"] == 0
    assert all(export_refusal(fmt, QuantSpec.parse(c["spec"])) is None for c in r["candidates"])
    ex = r["export"]
    assert ex["passed"] and ex["format"] == fmt and "transformers" in ex["loader"]
    assert ex["loader_ppl"] == pytest.approx(ex["advisor_ppl"], rel=TOL)
    assert ex["advisor_ppl"] == pytest.approx(r["baseline_ppl"] + r["measured_ppl_delta"], rel=1e-12)
    assert ex["message"] in r["message"]
    assert (tmp_path / "R" / "model" / "advisor-manifest.json").is_file()
    exported = tmp_path / "R" / fmt
    assert json.loads((exported / "advisor-manifest.json").read_text())["spec"] == r["spec"]
    # the native model saved beside it carries the same measurement, and exports to the same artifact
    saved = json.loads((tmp_path / "R" / "model" / "quantization.json").read_text())
    assert saved["ppl"] == ex["advisor_ppl"] and saved["protocol_fingerprint"] == r["protocol_fingerprint"]


def test_recommend_verify_export_without_out_and_refusals(tmp_path, tiny_folder, capsys):
    r = _json(capsys, ["recommend", "--model", str(tiny_folder), *RECOMMEND, "--store", str(tmp_path / "s.sqlite"),
                       "--verify-export", "gguf", "--json"])
    assert r["export"]["passed"] and r["export"]["path"] is None
    line = _one_error(capsys, ["recommend", "--model", str(tiny_folder), *RECOMMEND, "--dtypes", "nf4",
                               "--verify-export", "gguf"])
    assert "--verify-export gguf: none of the" in line and "rtn:int4:g32" in line


def test_recommend_verify_export_mismatch_fails_clearly(tmp_path, tiny_folder, capsys, monkeypatch):
    """An export that does not hold the measured grid (here: its scales doubled on the way out, the kind of
    bug a format writer can have) is caught by measuring it: exit 4, one error line with both numbers."""
    import advisor.models.export as export

    original = export.compressed_tensors_state

    def doubled_scales(modules, dtype):
        tensors, qconfig = original(modules, dtype)
        return {k: v * 2 if k.endswith("weight_scale") else v for k, v in tensors.items()}, qconfig

    monkeypatch.setattr(export, "compressed_tensors_state", doubled_scales)
    rc = main(["recommend", "--model", str(tiny_folder), *RECOMMEND, "--store", str(tmp_path / "s.sqlite"),
               "--verify-export", "compressed-tensors", "--json"])
    out, err = capsys.readouterr()
    assert rc == 4
    r = json.loads(out)
    assert not r["verified"] and r["exit_code"] == 4 and not r["export"]["passed"]
    assert abs(r["export"]["rel_diff"]) > r["export"]["tolerance"]
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]  # progress bars come before it
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err
    assert lines[0].startswith("error: export verification failed")
    assert f"{r['export']['loader_ppl']:.4f}" in lines[0] and f"{r['export']['advisor_ppl']:.4f}" in lines[0]
