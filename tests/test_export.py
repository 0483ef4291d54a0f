"""Native round trip and exports, each read back by the target's own loader, on tiny llama and qwen2 models.

Tolerance: a model read back by transformers (compressed-tensors decompression, or the GGUF loader's
dequantization) runs dense float32 matmuls where advisor runs its packed kernels; the summation order
differs, so its perplexity is required to match advisor's within 1e-4 relative. The native format is
advisor's own kernels on the same buffers: its perplexity must match bitwise.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config

SEQ, N_WIN = 32, 3
TOL = 1e-4


def _folder(tmp_path, tokenizer, arch, seed=0, bf16=False, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    config.vocab_size = len(tokenizer)
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config).eval()
    if bf16:  # values a bf16 checkpoint would hold (the common case): stored at 16 bits
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    folder = tmp_path / f"{arch}-src"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _windows(tokenizer):
    from advisor.models.data import eval_windows, load_corpus

    return eval_windows(tokenizer, load_corpus("stdlib-code:eval"), SEQ, N_WIN)


def _quantized(folder, spec):
    from advisor.models.evaluate import perplexity
    from advisor.models.loading import load
    from advisor.models.pipeline import quantize_model

    loaded = load(str(folder))
    result = quantize_model(loaded, spec, None, progress=False)
    windows = _windows(loaded.tokenizer)
    ppl = perplexity(loaded.model, windows, progress=False).ppl
    record = {"spec": spec, "ppl": ppl, "protocol": windows.protocol, "protocol_fingerprint": "test"}
    return loaded, result, record, windows


def _ppl(model, windows):
    from advisor.models.evaluate import perplexity

    return perplexity(model, windows, progress=False).ppl


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", ["rtn:int4:g32", "rtn:nf4:g16", "rtn:int3:g32:asym"])
def test_native_round_trip_is_bitwise(tmp_path, tiny_tokenizer, arch, spec):
    import advisor
    from advisor.kernels import QuantLinear
    from advisor.models.saving import save_quantized_model

    src = _folder(tmp_path, tiny_tokenizer, arch)
    loaded, result, record, windows = _quantized(src, spec)
    out = save_quantized_model(loaded, result, record, tmp_path / "q")
    back = advisor.load(str(out))
    assert back.info["packed"] and back.info["spec"] == spec
    n_packed = sum(isinstance(m, QuantLinear) for m in back.model.modules())
    assert n_packed == result.n_layers
    assert _ppl(back.model, windows) == record["ppl"]  # bitwise


def test_eval_cli_measures_the_saved_packed_model(tmp_path, tiny_folder, capsys):
    from advisor.cli import main

    args = ["--model", str(tiny_folder), "--max-windows", "2", "--seq-len", "32"]
    assert main(["quantize", *args, "--spec", "rtn:int4:g32", "--n-calib", "1", "--out", str(tmp_path / "q"),
                 "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(tmp_path / "q"), "--max-windows", "2", "--seq-len", "32", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["ppl"] == q["ppl"]
    manifest = json.loads((tmp_path / "q" / "advisor-manifest.json").read_text())
    assert manifest["spec"] == "rtn:int4:g32" and manifest["protocol_fingerprint"] == q["protocol_fingerprint"]
    # quantizing a quantized model is refused
    assert main(["quantize", "--model", str(tmp_path / "q"), "--spec", "rtn:int8", "--max-windows", "1",
                 "--seq-len", "32", "--n-calib", "1"]) != 0
    assert "already a quantized model" in capsys.readouterr().err


ASYM_XFAIL = pytest.mark.xfail(strict=True, reason=(
    "compressed-tensors 0.20.1 builds the empty model transformers loads into with unpacked zero points "
    "(its meta-device compress skips packing them), so transformers reports the packed checkpoint zero "
    "points as size mismatches and reinitialises them; the files follow the pack-quantized layout that "
    "compressed-tensors itself writes and decompresses (test_compressed_tensors_asym_decodes_exactly)"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", ["rtn:int4:g32", pytest.param("rtn:int4:g16:asym", marks=ASYM_XFAIL), "rtn:int8",
                                  "rtn:int4:g64", "rtn:int8:g32"])
def test_compressed_tensors_loads_in_transformers(tmp_path, tiny_tokenizer, arch, spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from advisor.models.export import export_model

    src = _folder(tmp_path, tiny_tokenizer, arch)
    loaded, result, record, windows = _quantized(src, spec)
    out = export_model(loaded, result, record, tmp_path / "ct", "compressed-tensors")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["advisor"]["spec"] == spec
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == loaded.tokenizer.get_vocab()
    assert _ppl(model, windows) == pytest.approx(record["ppl"], rel=TOL)


@pytest.mark.parametrize("spec", ["rtn:int4:g16:asym", "rtn:int8:g32:asym", "rtn:int4:g32"])
def test_compressed_tensors_asym_decodes_exactly(spec):
    """compressed-tensors' own decompressor turns our tensors into exactly QuantLinear's weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from advisor.models.export import compressed_tensors_state
    from advisor.quantizers import QuantSpec, get_method

    torch.manual_seed(0)
    s = QuantSpec.parse(spec)
    mod = get_method(s.method).quantize(torch.randn(64, 96), s, None).pack()
    tensors, qconfig = compressed_tensors_state({"l": mod}, torch.float32)
    group = next(iter(qconfig["config_groups"].values()))
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    local = {k.split(".", 1)[1]: v for k, v in tensors.items()}
    W = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    torch.testing.assert_close(W, mod.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("spec", ["rtn:int4:g32", "rtn:int8:g32", "rtn:int8", "rtn:mxfp4"])
def test_gguf_loads_in_transformers(tmp_path, tiny_tokenizer, arch, spec):
    from transformers import AutoModelForCausalLM

    from advisor.models.export import export_model

    src = _folder(tmp_path, tiny_tokenizer, arch)
    loaded, result, record, windows = _quantized(src, spec)
    path = export_model(loaded, result, record, tmp_path / "m.gguf", "gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert _ppl(model, windows) == pytest.approx(record["ppl"], rel=TOL)
    # advisor reads it back too (as a float model on the same grid), a folder holding one .gguf as well
    from advisor.models.loading import load

    (tmp_path / "only").mkdir()
    path.rename(tmp_path / "only" / path.name)
    assert _ppl(load(str(tmp_path / "only")).model, windows) == pytest.approx(record["ppl"], rel=TOL)


def test_gguf_blocks_decode_to_the_packed_grid():
    """Our Q4_0/Q8_0/MXFP4 bytes, decoded by the gguf package's own dequantizer, equal QuantLinear's weight."""
    import gguf

    from advisor.models.export import gguf_blocks
    from advisor.quantizers import QuantSpec, get_method

    torch.manual_seed(0)
    W = torch.randn(8, 96)
    for spec, qtype in (("rtn:int4:g32", "Q4_0"), ("rtn:int8:g64", "Q8_0"), ("rtn:int8", "Q8_0"),
                        ("rtn:mxfp4", "MXFP4")):
        s = QuantSpec.parse(spec)
        mod = get_method(s.method).quantize(W, s, None).pack()
        blocks = gguf_blocks(mod, qtype)
        W_gguf = gguf.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype)).reshape(8, 96)
        np.testing.assert_array_equal(W_gguf, mod.dequantize().numpy())


def test_gguf_refuses_specs_without_an_exact_type(tmp_path):
    from advisor.models.errors import AdvisorError
    from advisor.models.export import check_export_request
    from advisor.quantizers import QuantSpec

    for spec, nearest in (("rtn:nf4:g64", "rtn:int4:g32"), ("rtn:int4:g32:asym", "rtn:int4:g32"),
                          ("rtn:int4:g16", "rtn:int4:g32"), ("rtn:mxint8", "rtn:int8:g32")):
        with pytest.raises(AdvisorError, match=nearest):
            check_export_request("gguf", QuantSpec.parse(spec), tmp_path / "m.gguf")
    with pytest.raises(AdvisorError, match="integer grids"):
        check_export_request("compressed-tensors", QuantSpec.parse("rtn:nf4:g64"), tmp_path / "ct")


@pytest.mark.parametrize("spec,bits", [("rtn:int3:g32", 3), ("rtn:int4:g32", 4), ("rtn:int2:g32", 2),
                                       ("rtn:int8:g64", 8)])
def test_gptq_checkpoint_is_complete_and_decodes_exactly(tmp_path, tiny_tokenizer, spec, bits):
    from safetensors import safe_open

    from advisor.kernels import QuantLinear
    from advisor.kernels.gptq_format import read_gptq
    from advisor.models.export import export_model

    src = _folder(tmp_path, tiny_tokenizer, "llama", num_key_value_heads=4)  # k/v: 32 rows, whole 3-bit words
    loaded, result, record, _ = _quantized(src, spec)
    out = export_model(loaded, result, record, tmp_path / "gptq", "gptq")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == bits and config["quantization_config"]["quant_method"] == "gptq"
    assert (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    float_keys = {k for k in loaded.model.state_dict() if not any(
        k.startswith(n + ".") for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear))}
    assert float_keys - {"lm_head.weight"} <= keys  # embeddings, norms (the head when not tied)
    decoded = read_gptq(str(out))
    for name, mod in loaded.model.named_modules():
        if isinstance(mod, QuantLinear):
            torch.testing.assert_close(decoded[name], mod.dequantize(), rtol=0, atol=1e-6)


def test_gptq_3bit_packing_matches_autogptq_layout():
    """3-bit: 32 codes fill 3 words; code 10 straddles words 0/1 (2 low bits at bit 30), code 21 words 1/2."""
    from advisor.kernels.gptq_format import _pack_along_dim0, _unpack_along_dim0

    codes = np.arange(32, dtype=np.int64).reshape(32, 1) % 8
    words = _pack_along_dim0(codes, 3).view(np.uint32)[:, 0].astype(np.uint64)
    assert words.shape == (3,)
    assert (int(words[0]) >> 30) == (10 % 8) & 0b11 and int(words[1]) & 1 == ((10 % 8) >> 2) & 1
    assert ((int(words[1]) >> 31) | ((int(words[2]) & 0b11) << 1)) == 21 % 8
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        v = rng.integers(0, 2 ** bits, size=(64, 5))
        np.testing.assert_array_equal(_unpack_along_dim0(_pack_along_dim0(v, bits), bits), v)


def test_bytes_on_disk_match_the_plan(tmp_path, tiny_tokenizer):
    """The native file's size is what `plan` counts for the spec, within 3%."""
    from advisor.candidates import enumerate_candidates
    from advisor.models.loading import load
    from advisor.models.pipeline import quantize_model
    from advisor.models.saving import NATIVE_WEIGHTS, save_quantized_model

    src = _folder(tmp_path, tiny_tokenizer, "llama", bf16=True, hidden_size=256, intermediate_size=512,
                  num_attention_heads=8, num_key_value_heads=4)
    for spec in ("rtn:int4:g128", "rtn:int8"):
        loaded = load(str(src))
        planned = enumerate_candidates(loaded, [spec])[0].bytes
        result = quantize_model(loaded, spec, None, progress=False)
        out = save_quantized_model(loaded, result, {"spec": spec}, tmp_path / f"q-{spec.replace(':', '-')}")
        on_disk = (out / NATIVE_WEIGHTS).stat().st_size
        assert abs(on_disk - planned) / planned < 0.03, (spec, on_disk, planned)
