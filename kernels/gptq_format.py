"""Export integer group-quantized layers in the GPTQ checkpoint layout read by transformers/vLLM.

(:mod:`advisor.models.export` writes the complete checkpoint: these layers plus every other tensor,
config.json with its ``quantization_config``, and the tokenizer.)

Convention (AutoGPTQ "gptq" checkpoint format, a.k.a. v1; checked against the public AutoGPTQ /
GPTQModel / vLLM sources and discussions, e.g. vLLM PR #26092 and #38966):

- ``qweight`` int32 (in * bits / 32, out): the codes of an output column are one little-endian bit
  stream, input row ``i`` at bit ``bits * i`` (3-bit values may straddle two words);
- ``qzeros`` int32 (n_groups, out / p), packed the same way along the output dim, holding
  ``zero - 1`` (v1 stores the zero point minus one; "gptq_v2" stores it as is);
- ``scales`` float16 (n_groups, out); ``g_idx`` int32 (in,) = ``i // group_size`` (no act-order);
- ``W[o, i] = scales[g, o] * (q[i, o] - (qzeros[g, o] + 1))`` with ``g = g_idx[i]``.

Our layers store ``W = table[c] * s + z`` with an affine integer table ``t0 + t1 c``, so
``scale = s t1`` and ``zero = -(s t0 + z) / (s t1)``, which must be an integer in [1, 2**bits]
(zero 0 cannot be written in v1: ``zero - 1`` would be -1).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from .codebook import classify_table
from .io import _atomic_save, atomic_write_text
from .linear import QuantLinear


def _pack_along_dim0(values: np.ndarray, bits: int) -> np.ndarray:
    """uint values (n, m), n * bits % 32 == 0 -> int32 (n * bits / 32, m).

    The codes of a column form one little-endian bit stream, value ``i`` at bits ``bits * i``: for
    2/4/8 bits that is ``32 / bits`` whole values per word, lowest first; for 3 bits 32 values fill
    three words and values 10 and 21 straddle a word boundary (AutoGPTQ's 3-bit layout).
    """
    n, m = values.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} values of {bits} bits do not fill whole 32-bit words")
    v = values.astype(np.uint32)
    planes = ((v[:, None, :] >> np.arange(bits, dtype=np.uint32)[None, :, None]) & 1).reshape(n * bits // 32, 32, m)
    words = np.zeros((n * bits // 32, m), np.uint64)
    for j in range(32):
        words |= planes[:, j, :].astype(np.uint64) << np.uint64(j)
    return words.astype(np.uint32).view(np.int32)


def _unpack_along_dim0(words: np.ndarray, bits: int) -> np.ndarray:
    w = words.view(np.uint32)
    k, m = w.shape
    planes = ((w[:, None, :] >> np.arange(32, dtype=np.uint32)[None, :, None]) & 1).reshape(k * 32 // bits, bits, m)
    out = np.zeros((k * 32 // bits, m), np.int64)
    for b in range(bits):
        out |= planes[:, b, :].astype(np.int64) << b
    return out


def integer_grid(mod: QuantLinear) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, bool]:
    """A layer on an integer grid as ``W[o, i] = scale[o, g] * (code[o, i] - zero[o, g])``.

    Returns (codes int64 (out, in), scale float32 (out, n_groups), zero int64 (out, n_groups),
    symmetric: the layer stores no offsets). Raises ValueError (saying why) for a layer that is not
    one: a non-affine table (fp, nf, codebooks), outliers, an AWQ input scale, per-row tables, or a
    zero point that is not an integer.
    """
    if mod.table.ndim != 1 or hasattr(mod, "outlier_index") or hasattr(mod, "input_scale"):
        raise ValueError("needs a shared table and no outliers / input_scale")
    rule = classify_table(mod.table.float().numpy(), mod.bits)
    if rule.kind != "affine":
        raise ValueError(f"needs an integer (affine) table, got {rule.kind}")
    s = mod.group_scales().double()
    z = mod.group_offsets()
    symmetric = z is None
    z = torch.zeros_like(s) if z is None else z.double()
    scale = s * rule.mult  # (out, n_groups)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = -(s * rule.add + z) / safe
    zero_int = torch.round(zero)
    # fp16 offsets carry ~2**-11 relative error, i.e. up to 0.125 of a step at zero = 256
    if ((zero - zero_int).abs() > torch.clamp(zero.abs() * 2.0 ** -10, min=0.05)).any():
        raise ValueError("zero point is not an integer: not an integer-grid layer")
    codes = mod.codes().cpu().numpy().astype(np.int64)
    return codes, scale.float(), zero_int.long(), symmetric


def gptq_tensors(mod: QuantLinear) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx (and bias) of one layer in the GPTQ v1 layout (2, 3, 4, 8 bits).

    ``in`` and ``out`` must fill whole 32-bit words (multiples of 32 / gcd(bits, 32) values); a last
    partial group is allowed (``g_idx = i // group_size``).
    """
    bits, g = mod.bits, mod.group_size
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"GPTQ export supports 2/3/4/8-bit codes, not {bits}")
    if (mod.in_features * bits) % 32 or (mod.out_features * bits) % 32:
        raise ValueError("GPTQ export needs in and out to fill whole 32-bit words of "
                         f"{bits}-bit codes; got in={mod.in_features}, out={mod.out_features}")
    codes, scale, zero_int, _ = integer_grid(mod)
    if zero_int.min() < 1 or zero_int.max() > 2 ** bits:
        raise ValueError(f"zero point outside [1, {2 ** bits}] cannot be stored in GPTQ v1")
    out = {
        "qweight": torch.from_numpy(_pack_along_dim0(codes.T, bits)),
        # zeros (out, n_groups) -> packed along out -> (n_groups, out * bits / 32)
        "qzeros": torch.from_numpy(
            _pack_along_dim0(zero_int.numpy().astype(np.int64) - 1, bits).T.copy()),
        "scales": scale.T.contiguous().half(),
        "g_idx": torch.arange(mod.in_features, dtype=torch.int32) // g,
    }
    if mod.bias is not None:
        out["bias"] = mod.bias.half()
    return out


def export_gptq(directory: str, modules: dict[str, QuantLinear], metadata: dict | None = None,
                filename: str = "model.safetensors") -> str:
    """Write ``<name>.qweight/.qzeros/.scales/.g_idx`` for every layer plus quantize_config.json.

    All layers must share bits and group size. Returns the safetensors path.
    """
    mods = list(modules.values())
    bits = {m.bits for m in mods}
    groups = {m.group_size for m in mods}
    if len(bits) != 1 or len(groups) != 1:
        raise ValueError("all layers of a GPTQ checkpoint share bits and group size")
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in gptq_tensors(m).items()}
    path = os.path.join(directory, filename)
    _atomic_save(tensors, path, {"format": "pt", "quantizer": "advisor",
                                 "metadata": json.dumps(metadata or {}, sort_keys=True)})
    config = {"bits": bits.pop(), "group_size": groups.pop(), "desc_act": False,
              "sym": all(m.group_offsets() is None for m in mods), "true_sequential": True,
              "checkpoint_format": "gptq", "quant_method": "gptq"}
    atomic_write_text(os.path.join(directory, "quantize_config.json"), json.dumps(config, indent=2))
    return path


def read_gptq(directory: str, filename: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """Dequantize a GPTQ v1 checkpoint by its published formula -> {layer name: W (out, in)}."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "quantize_config.json")) as f:
        bits = json.load(f)["bits"]
    tensors = load_file(os.path.join(directory, filename))
    weights = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        q = _unpack_along_dim0(tensors[key].numpy(), bits)  # (in, out)
        zeros = _unpack_along_dim0(tensors[f"{name}.qzeros"].numpy().T.copy(), bits).T + 1
        scales = tensors[f"{name}.scales"].float().numpy()  # (n_groups, out)
        g_idx = tensors[f"{name}.g_idx"].numpy().astype(np.int64)
        W = scales[g_idx] * (q - zeros[g_idx])  # (in, out)
        weights[name] = torch.from_numpy(W.T.astype(np.float32)).contiguous()
    return weights
