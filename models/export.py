"""Write a packed model in the formats serving runtimes read: advisor native, compressed-tensors, GPTQ, GGUF.

Every format holds the very grid advisor measured (no re-quantization): each export is refused, with
the reason, when the layers' values cannot be written exactly in it.

- ``native``: :func:`advisor.models.saving.save_quantized_model` (every spec; advisor loads it back).
- ``compressed-tensors``: the ``pack-quantized`` weight-only layout (``quant_method =
  "compressed-tensors"``) read by transformers with the ``compressed-tensors`` package and by vLLM;
  integer grids of 2-8 bits at their group size, symmetric or asymmetric.
- ``gptq``: a complete GPTQ v1 checkpoint (all tensors, ``config.json`` with its
  ``quantization_config``, tokenizer), 2/3/4/8 bits (:mod:`advisor.kernels.gptq_format`).
- ``gguf``: one ``.gguf`` file written with the ``gguf`` package for llama, mistral and qwen2
  architectures; int8 (groups of 32 or multiples) as Q8_0, symmetric int4 (same) as Q4_0, mxfp4 as
  MXFP4. Other specs are refused with the nearest spec that maps exactly.

Each export records the spec, the measured result and the protocol fingerprint: in the manifest, in
``config.json`` (``advisor`` key) for the folder formats, in ``advisor.*`` keys of a GGUF file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advisor.models.errors import AdvisorError
from advisor.models.saving import (GGUF_MARKER, check_output, save_quantized_model, split_model_state,
                                   storage_dtype, write_output_folder)

FORMATS = ("native", "compressed-tensors", "gptq", "gguf")
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTE_QK = {"llama", "mistral"}  # llama.cpp's rope layout: q/k rows permuted on conversion


# ------------------------------------------------------------------------------------ validation
def gguf_type_for(spec) -> tuple[str | None, str]:
    """(GGUF tensor type, '') for a spec whose grid maps exactly, else (None, why + nearest exact spec)."""
    g = spec.group_size
    asym = not spec.symmetric
    if spec.dtype == "mxfp4":
        return "MXFP4", ""
    if spec.dtype in ("int8", "int4") and not asym and (g is None or g % 32 == 0):
        return ("Q8_0" if spec.dtype == "int8" else "Q4_0"), ""
    nearest = {"int8": f"{spec.method}:int8:g32", "int4": f"{spec.method}:int4:g32",
               "mxint8": f"{spec.method}:int8:g32", "fp4_e2m1": f"{spec.method}:mxfp4",
               "mxint4": f"{spec.method}:mxfp4", "nf4": f"{spec.method}:int4:g32"}.get(
        spec.dtype, f"{spec.method}:int4:g32")
    return None, (f"{spec} has no exact GGUF type (GGUF stores int8 as Q8_0 and symmetric int4 as Q4_0 in "
                  f"groups of 32, and mxfp4 as MXFP4); the nearest spec that maps exactly is {nearest}")


def export_refusal(fmt: str, spec) -> str | None:
    """Why ``fmt`` cannot hold ``spec``'s grid exactly (one sentence naming what to use), or None."""
    if fmt not in FORMATS:
        return f"--format {fmt!r} is not one of {', '.join(FORMATS)}"
    dt = spec.dtype
    if fmt in ("compressed-tensors", "gptq"):
        from advisor.quantizers import get_dtype

        if get_dtype(dt).family != "int" or (fmt == "gptq" and get_dtype(dt).bits not in (2, 3, 4, 8)):
            return (f"--format {fmt} holds integer grids ({'2/3/4/8' if fmt == 'gptq' else '2-8'} bits); "
                    f"{spec} is {dt}. Use --format native, or an int spec such as {spec.method}:int4:g128")
        if spec.method in ("quantease-outlier",):
            return f"--format {fmt} cannot hold {spec}'s sparse outliers; use --format native"
        if spec.method == "awq":
            return (f"--format {fmt} cannot hold AWQ's per-channel input scales as advisor packs them; "
                    "use --format native, or gptq/rtn for this format")
    if fmt == "gguf":
        qtype, why = gguf_type_for(spec)
        if qtype is None:
            return f"--format gguf: {why}"
        if spec.method in ("awq", "quantease-outlier"):
            return f"--format gguf cannot hold {spec.method}'s extra tensors; use --format native"
    return None


def check_export_request(fmt: str, spec, out: str | Path, *, force: bool = False, option: str = "--out") -> Path:
    """Refuse, before any work, an output path or a (format, spec) pair that cannot be written."""
    why = export_refusal(fmt, spec)
    if why is not None:
        raise AdvisorError(why)
    if fmt == "gguf" and Path(out).suffix == ".gguf":
        return check_output(out, option, force=force, file=True)
    return check_output(out, option, force=force)


def check_export_architecture(fmt: str, config) -> None:
    """Refuse a model whose architecture ``fmt`` has no layout for (GGUF: llama, mistral, qwen2)."""
    if fmt == "gguf" and getattr(config, "model_type", None) not in GGUF_ARCHS:
        raise AdvisorError(f"--format gguf supports the {', '.join(sorted(GGUF_ARCHS))} architectures; "
                           f"this model is {getattr(config, 'model_type', '?')}. Use --format native or "
                           "compressed-tensors")


# ------------------------------------------------------------------------------------ helpers
def _record_summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("spec", "ppl", "baseline_ppl", "ppl_delta", "dl", "protocol_fingerprint", "bits_per_weight")
    out = {k: record[k] for k in keys if k in record}
    if "protocol" in record:
        out["protocol"] = record["protocol"]
    return out


def _float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """float16 when every tensor (and the fp16 scales) is exact in it, else float32."""
    for t in tensors.values():
        if t.is_floating_point() and storage_dtype(t.float()) not in (torch.float16,):
            if not torch.equal(t.float().half().float(), t.float()):
                return torch.float32
    return torch.float16


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _save_config(loaded, tmp: Path, dtype: torch.dtype, quantization_config: dict | None,
                 summary: dict[str, Any]) -> None:
    import copy

    config = copy.deepcopy(loaded.model.config)
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.dtype = dtype
    config.advisor = summary
    config.save_pretrained(tmp)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(tmp)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", "advisor": json.dumps(summary, sort_keys=True, default=str)})


def _layer_error(fmt: str, name: str, e: Exception) -> AdvisorError:
    return AdvisorError(f"--format {fmt}: layer {name} cannot be written exactly ({e}); use --format native")


# ------------------------------------------------------------------------------ compressed-tensors
def compressed_tensors_state(modules: dict, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """pack-quantized tensors of every packed layer and the ``quantization_config`` that describes them."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from advisor.kernels.gptq_format import integer_grid

    tensors: dict[str, torch.Tensor] = {}
    kinds: set = set()
    groups: dict[tuple, list[str]] = {}
    for name, mod in modules.items():
        try:
            codes, scale, zero, symmetric = integer_grid(mod)
        except ValueError as e:
            raise _layer_error("compressed-tensors", name, e) from None
        bits, half = mod.bits, 2 ** (mod.bits - 1)
        zp = zero - half  # compressed-tensors' signed codes: q = code - 2**(bits-1), W = scale * (q - zp)
        if symmetric and bool((zp != 0).any()):
            raise _layer_error("compressed-tensors", name, ValueError("symmetric grid not centred on zero"))
        if bool((zp < -half).any() or (zp >= half).any()):
            raise _layer_error("compressed-tensors", name, ValueError("zero point outside the code range"))
        q = torch.from_numpy(codes - half).to(torch.int8)
        tensors[f"{name}.weight_packed"] = pack_to_int32(q, bits)
        tensors[f"{name}.weight_scale"] = scale.to(dtype)
        tensors[f"{name}.weight_shape"] = torch.tensor([mod.out_features, mod.in_features])
        if not symmetric:
            tensors[f"{name}.weight_zero_point"] = pack_to_int32(zp.to(torch.int8), bits, packed_dim=0)
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.to(dtype)
        kinds.add((bits, symmetric))
        # vLLM and transformers read "group" (in a multiple of the group size) and "channel" (one group per
        # row); a last partial group is written as 1 x group_size blocks, which compressed-tensors pads
        if mod.n_groups == 1:
            strategy = ("channel", None)
        elif mod.in_features % mod.group_size == 0:
            strategy = ("group", mod.group_size)
        else:
            if not symmetric:
                raise _layer_error("compressed-tensors", name, ValueError(
                    f"in_features {mod.in_features} is not a multiple of the group size {mod.group_size} "
                    "and the grid is asymmetric"))
            strategy = ("block", mod.group_size)
        groups.setdefault(strategy, []).append(name)
    if len(kinds) != 1:
        raise AdvisorError("--format compressed-tensors: the packed layers differ in bits or symmetry; "
                           "use --format native")
    bits, symmetric = kinds.pop()
    config_groups = {}
    for i, ((strategy, g), names) in enumerate(sorted(groups.items(), key=lambda kv: kv[0][0])):
        weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
                   "strategy": strategy, "group_size": g if strategy == "group" else None,
                   "block_structure": [1, g] if strategy == "block" else None, "actorder": None,
                   "observer": "minmax"}
        config_groups[f"group_{i}"] = {"targets": sorted(names), "weights": weights, "input_activations": None,
                                       "output_activations": None, "format": "pack-quantized"}
    qconfig = {"quant_method": "compressed-tensors", "format": "pack-quantized",
               "quantization_status": "compressed", "config_groups": config_groups,
               "ignore": [], "kv_cache_scheme": None}
    return tensors, qconfig


def _export_compressed_tensors(loaded, record, out, force) -> Path:
    modules, others, aliases = split_model_state(loaded.model)
    dtype = _float_dtype(others)
    qtensors, qconfig = compressed_tensors_state(modules, dtype)
    qconfig["ignore"] = sorted(n for n in _linear_names(loaded.model) if n not in modules)
    summary = _record_summary(record)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in others.items()}
    tensors.update(qtensors)

    def fill(tmp: Path) -> None:
        _save_tensors(tmp / "model.safetensors", tensors, summary)
        _save_config(loaded, tmp, dtype, qconfig, summary)

    return write_output_folder(out, fill, dict(summary, advisor_output="compressed-tensors",
                                               format="compressed-tensors/pack-quantized"), force=force)


# ----------------------------------------------------------------------------------------- gptq
def _export_gptq(loaded, record, out, force) -> Path:
    from advisor.kernels.gptq_format import gptq_tensors

    modules, others, aliases = split_model_state(loaded.model)
    dtype = _float_dtype(others)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in others.items()}
    bits, groups, sym = set(), set(), set()
    for name, mod in modules.items():
        try:
            for k, v in gptq_tensors(mod).items():
                tensors[f"{name}.{k}"] = v.to(dtype) if k == "bias" else v
        except ValueError as e:
            raise _layer_error("gptq", name, e) from None
        bits.add(mod.bits)
        if mod.n_groups > 1:  # one group per row fits any group size >= in
            groups.add(mod.group_size)
        sym.add(mod.group_offsets() is None)
    if len(bits) != 1 or len(groups) > 1:
        raise AdvisorError("--format gptq: all layers of a GPTQ checkpoint share bits and group size")
    qconfig = {"quant_method": "gptq", "bits": bits.pop(), "group_size": groups.pop() if groups else -1,
               "desc_act": False,
               "sym": sym == {True}, "true_sequential": True, "checkpoint_format": "gptq",
               "modules_in_block_to_quantize": None}
    summary = _record_summary(record)

    def fill(tmp: Path) -> None:
        _save_tensors(tmp / "model.safetensors", tensors, summary)
        _save_config(loaded, tmp, dtype, qconfig, summary)
        (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))

    return write_output_folder(out, fill, dict(summary, advisor_output="gptq", format="gptq/v1"), force=force)


# ----------------------------------------------------------------------------------------- gguf
def _permute_rows(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotate-half rope -> interleaved); rows may be block bytes."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_blocks(mod, qtype: str) -> np.ndarray:
    """The layer's codes and scales as GGUF blocks of 32, uint8 (out, n_blocks * bytes_per_block).

    Raises ValueError when the layer's grid is not exactly that type's.
    """
    from advisor.kernels.codebook import classify_table

    out_f, in_f = mod.out_features, mod.in_features
    if in_f % 32:
        raise ValueError(f"in_features {in_f} is not a multiple of GGUF's block of 32")
    if hasattr(mod, "outlier_index") or hasattr(mod, "input_scale") or mod.table.ndim != 1:
        raise ValueError("outliers, input scales or per-row tables have no GGUF form")
    g = mod.group_size if mod.n_groups > 1 else in_f
    if g % 32:
        raise ValueError(f"group size {g} is not a multiple of 32")
    codes = mod.codes().cpu().numpy().astype(np.uint8).reshape(out_f, in_f // 32, 32)
    table = mod.table.float().numpy()
    per_block = np.repeat(np.arange(mod.n_groups), g // 32)[: in_f // 32]
    if qtype == "MXFP4":
        if not hasattr(mod, "scale_exp"):
            raise ValueError("MXFP4 needs power-of-two (E8M0) scales")
        from advisor.quantizers import get_dtype

        e = mod.scale_exp.numpy().astype(np.int16)[:, per_block] + 127
        mx = np.array(get_dtype("mxfp4").table, np.float32)
        if e.min() < 0 or e.max() > 254 or not np.array_equal(table, mx):
            raise ValueError("scale exponent or element table outside MXFP4's")
        qs = codes[..., :16] | (codes[..., 16:] << 4)
        return np.concatenate([e.astype(np.uint8)[..., None], qs], axis=-1).reshape(out_f, -1)
    if mod.group_offsets() is not None:
        raise ValueError("asymmetric grids have no exact Q8_0/Q4_0 form")
    rule = classify_table(table, mod.bits)
    bits = {"Q8_0": 8, "Q4_0": 4}[qtype]
    if rule.kind != "affine" or mod.bits != bits or rule.mult != 1 or rule.add != -(2 ** (bits - 1)):
        raise ValueError(f"the table is not the {bits}-bit two's-complement grid of {qtype}")
    scales = mod.group_scales().numpy()
    d = scales.astype(np.float16)
    if not np.array_equal(d.astype(np.float32), scales):
        raise ValueError("scales are not exact in float16")
    d = np.ascontiguousarray(d[:, per_block]).view(np.uint8).reshape(out_f, in_f // 32, 2)
    if qtype == "Q8_0":
        q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([d, q], axis=-1).reshape(out_f, -1)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([d, qs], axis=-1).reshape(out_f, -1)


def _gguf_float(t: torch.Tensor, force_f32: bool) -> tuple[np.ndarray, Any]:
    import gguf

    dt = storage_dtype(t.float())
    if force_f32 or dt == torch.float32:
        return t.float().numpy(), None
    if dt == torch.float16:
        return t.float().numpy().astype(np.float16), None
    raw = t.float().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(*t.shape[:-1], -1)
    return raw, gguf.GGMLQuantizationType.BF16


def _copy_tokenizer_fields(writer, source: str) -> None:
    """Copy ``tokenizer.*`` keys from the GGUF the model was loaded from."""
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            vals = [field.parts[i] for i in field.data]
            if sub == gguf.GGUFValueType.STRING:
                vals = [bytes(v).decode("utf-8") for v in vals]
            else:
                vals = [v.tolist()[0] for v in vals]
            writer.add_array(key, vals)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(key, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(key, field.parts[field.data[0]].tolist()[0], vtype)


def _add_hf_tokenizer(writer, tokenizer) -> None:
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        vocab = gguf.vocab.BpeVocab(Path(d))
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text)
            scores.append(float(score))
            types.append(ttype)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)  # transformers' GGUF tokenizer converter for llama reads them
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(d), load_merges=True, n_vocab=len(tokens))
        eos = tokenizer.eos_token_id
        if eos is not None:  # readers otherwise invent their own unk/pad tokens beyond the vocabulary
            for kind, tid in (("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
                special.special_token_ids.setdefault(kind, eos if tid is None else tid)
        special.add_to_gguf(writer)


def _export_gguf(loaded, record, spec, out, force) -> Path:
    import gguf

    config = loaded.model.config
    check_export_architecture("gguf", config)
    arch = GGUF_ARCHS[config.model_type]
    qtype, why = gguf_type_for(spec)
    if qtype is None:
        raise AdvisorError(f"--format gguf: {why}")
    modules, others, aliases = split_model_state(loaded.model)
    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    summary = _record_summary(record)
    target = Path(out)
    if target.suffix != ".gguf":
        folder, file_name = target, f"model-{str(spec).replace(':', '-')}.gguf"
    else:
        folder, file_name = None, target.name

    def gguf_name(hf: str) -> str:
        base, _, suffix = hf.rpartition(".")
        mapped = name_map.get_name(base)
        if mapped is None:
            raise AdvisorError(f"--format gguf: tensor {hf} has no GGUF name for {arch}; use --format native")
        return f"{mapped}.{suffix}"

    def write(path: Path) -> None:
        w = gguf.GGUFWriter(str(path), arch)
        w.add_name(str(getattr(config, "_name_or_path", "") or loaded.source.name)[:200])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("general.quantized_by", "advisor")
        w.add_string("advisor.spec", str(spec))
        w.add_string("advisor.record", json.dumps(summary, sort_keys=True, default=str))
        w.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv or n_head)
        w.add_rope_dimension_count(head_dim)
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        w.add_rope_freq_base(float(theta or getattr(config, "rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_vocab_size(config.vocab_size)
        if loaded.source.kind == "gguf":
            _copy_tokenizer_fields(w, loaded.source.resolved)
        else:
            _add_hf_tokenizer(w, loaded.tokenizer)
        for hf, t in others.items():
            arr, raw = _gguf_float(t, force_f32=t.ndim == 1)
            if ".self_attn.q_proj." in hf and arch == "llama":
                arr = _permute_rows(arr, n_head, n_head)
            elif ".self_attn.k_proj." in hf and arch == "llama":
                arr = _permute_rows(arr, n_head, n_kv)
            if raw is None:
                w.add_tensor(gguf_name(hf), arr)
            else:
                w.add_tensor(gguf_name(hf), arr, raw_dtype=raw)
        for name, mod in modules.items():
            try:
                blocks = gguf_blocks(mod, qtype)
            except ValueError as e:
                raise _layer_error("gguf", name, e) from None
            if arch == "llama" and name.endswith("self_attn.q_proj"):
                blocks = _permute_rows(blocks, n_head, n_head)
            elif arch == "llama" and name.endswith("self_attn.k_proj"):
                blocks = _permute_rows(blocks, n_head, n_kv)
            w.add_tensor(gguf_name(f"{name}.weight"), np.ascontiguousarray(blocks),
                         raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
            if mod.bias is not None:
                w.add_tensor(gguf_name(f"{name}.bias"), mod.bias.float().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    if folder is not None:
        return write_output_folder(folder, lambda tmp: write(tmp / file_name),
                                   dict(summary, advisor_output="gguf", format=f"gguf/{qtype}"),
                                   force=force) / file_name
    from advisor.kernels.io import atomic_path

    check_output(out, force=force, file=True)
    try:
        with atomic_path(target) as tmp:
            write(tmp)
    except AdvisorError:
        raise
    except OSError as e:
        raise AdvisorError(f"could not write --out {out}: {e.strerror or e} (disk full or not writable?); "
                           "nothing of this write was left behind") from e
    assert GGUF_MARKER  # the key above marks the file as advisor's for a later --out check
    return target


# ----------------------------------------------------------------------------------------- entry
def export_model(loaded, result, record: dict[str, Any], out: str | Path, fmt: str = "native", *,
                 force: bool = False) -> Path:
    """Write the packed model of ``loaded`` in ``fmt``; returns the folder (or .gguf file) written.

    ``result`` is the pipeline's result (None for a model loaded from a native folder: ``record``
    then carries the spec)."""
    from advisor.quantizers import QuantSpec

    spec = QuantSpec.parse(str(result.spec if result is not None else record["spec"]))
    if fmt == "native":
        if result is None:
            raise AdvisorError("the model is already in advisor's native format; copy its folder instead")
        return save_quantized_model(loaded, result, record, out, force=force)
    if fmt == "compressed-tensors":
        return _export_compressed_tensors(loaded, record, out, force)
    if fmt == "gptq":
        return _export_gptq(loaded, record, out, force)
    if fmt == "gguf":
        return _export_gguf(loaded, record, spec, out, force)
    raise AdvisorError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")


# ------------------------------------------------------------------------ from a saved native folder
_RECORD_LIMIT = 16 << 20  # quantization.json is a few kB; anything far larger is not advisor's


def saved_record(folder: str | Path) -> dict[str, Any]:
    """The measured record of a native folder: its ``quantization.json`` (spec, ppl, baseline, protocol
    and its fingerprint), falling back to the manifest's summary for a key the record lacks.

    Raises:
        AdvisorError: ``folder`` is not an advisor native folder, or its record is unreadable.
    """
    from advisor.models.native import native_folder
    from advisor.models.saving import MANIFEST, read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if not native_folder(folder) or manifest is None or manifest.get("advisor_output") != "native":
        raise AdvisorError(f"--model {folder} is not an advisor native folder (one that `advisor quantize --out DIR` "
                           f"or `advisor recommend --out R` (in R/model) writes, with {MANIFEST}); export reads "
                           "those, so quantize the model first")
    path = folder / "quantization.json"
    try:
        if not path.is_file() or path.stat().st_size > _RECORD_LIMIT:
            raise ValueError("missing or too large")
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise AdvisorError(f"{path} cannot be read ({e}); quantize again with --out") from None
    for key in ("spec", "ppl", "baseline_ppl", "protocol_fingerprint", "bits_per_weight"):
        if key not in record and key in manifest:
            record[key] = manifest[key]
    if not isinstance(record.get("spec"), str):
        raise AdvisorError(f"{path} names no spec; quantize again with --out")
    record["exported_from"] = {"format": manifest.get("format"), "files": manifest.get("files")}
    return record


# ---------------------------------------------------------------------- read back by the target's loader
LOADER_FORMATS = ("compressed-tensors", "gguf")  # formats with a loader that runs on a CPU here


def load_export(path: str | Path, fmt: str, dtype: torch.dtype = torch.float32):
    """``(model, loader description)``: the exported artifact as its target runtime's own loader builds
    it, transformers with the compressed-tensors package or transformers' GGUF loader (``gguf_file=``).

    Raises:
        AdvisorError: no CPU loader for ``fmt`` here, the load fails, or it reports missing, unexpected
            or mismatched weights (which transformers would otherwise initialise or drop).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    kw: dict[str, Any] = {"dtype": dtype, "output_loading_info": True}
    if fmt == "gguf":
        if path.is_dir():
            found = sorted(path.glob("*.gguf"))
            if len(found) != 1:
                raise AdvisorError(f"{path} holds {len(found)} .gguf files; expected the one export")
            path = found[0]
        folder, kw["gguf_file"] = path.parent, path.name
        loader = "transformers (gguf_file=)"
    elif fmt == "compressed-tensors":
        folder, loader = path, "transformers (compressed-tensors)"
    else:
        raise AdvisorError(f"--verify-export {fmt}: no loader for it runs on this machine; verify one of "
                           f"{', '.join(LOADER_FORMATS)}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    except Exception as e:  # noqa: BLE001 - the target loader's failure, whatever its type, is the finding
        raise AdvisorError(f"{loader} could not load the {fmt} export {path}: {type(e).__name__}: "
                           f"{str(e)[:300]}") from e
    bad = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        parts = "; ".join(f"{len(v)} {k.replace('_', ' ')} ({', '.join(str(x) for x in v[:3])})"
                          for k, v in bad.items())
        raise AdvisorError(f"{loader} loaded the {fmt} export {path} with {parts}: it would run weights advisor "
                           "did not measure")
    return model.eval(), loader
