"""Export integer group-quantized layers in the GPTQ checkpoint layout read by transformers/vLLM.

Convention (AutoGPTQ "gptq" checkpoint format, a.k.a. v1; checked against the public AutoGPTQ /
GPTQModel / vLLM sources and discussions, e.g. vLLM PR #26092 and #38966):

- ``qweight`` int32 (in / p, out), p = 32 / bits: code of input row ``i`` sits in word
  ``i // p`` at bit ``bits * (i % p)`` (lowest bits first);
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
from .io import _atomic_save
from .linear import QuantLinear


def _pack_along_dim0(values: np.ndarray, bits: int) -> np.ndarray:
    """uint values (n, m), n % (32/bits) == 0 -> int32 (n / p, m), lowest bits first."""
    p = 32 // bits
    v = values.astype(np.uint64).reshape(values.shape[0] // p, p, values.shape[1])
    word = np.zeros(v.shape[::2], np.uint64)
    for r in range(p):
        word |= v[:, r, :] << np.uint64(bits * r)
    return word.astype(np.uint32).view(np.int32)


def _unpack_along_dim0(words: np.ndarray, bits: int) -> np.ndarray:
    p = 32 // bits
    w = words.view(np.uint32).astype(np.int64)
    parts = [(w >> (bits * r)) & ((1 << bits) - 1) for r in range(p)]
    return np.stack(parts, axis=1).reshape(w.shape[0] * p, w.shape[1])


def gptq_tensors(mod: QuantLinear) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx (and bias) of one layer in the GPTQ v1 layout."""
    bits, g = mod.bits, mod.group_size
    if bits not in (2, 4, 8):
        raise ValueError(f"GPTQ export supports 2/4/8-bit codes, not {bits}")
    p = 32 // bits
    if mod.in_features % g or mod.in_features % p or mod.out_features % p:
        raise ValueError("GPTQ export needs in % group_size == 0 and in, out multiples of "
                         f"{p}; got in={mod.in_features}, out={mod.out_features}, g={g}")
    if mod.table.ndim != 1 or hasattr(mod, "outlier_index") or hasattr(mod, "input_scale"):
        raise ValueError("GPTQ export needs a shared table and no outliers / input_scale")
    rule = classify_table(mod.table.numpy(), bits)
    if rule.kind != "affine":
        raise ValueError(f"GPTQ export needs an integer (affine) table, got {rule.kind}")
    s = mod.group_scales().double()
    z = mod.group_offsets()
    z = torch.zeros_like(s) if z is None else z.double()
    scale = s * rule.mult  # (out, n_groups)
    zero = -(s * rule.add + z) / scale
    zero_int = torch.round(zero)
    # fp16 offsets carry ~2**-11 relative error, i.e. up to 0.125 of a step at zero = 256
    if ((zero - zero_int).abs() > torch.clamp(zero.abs() * 2.0 ** -10, min=0.05)).any():
        raise ValueError("zero point is not an integer: not an integer-grid layer")
    if zero_int.min() < 1 or zero_int.max() > 2 ** bits:
        raise ValueError(f"zero point outside [1, {2 ** bits}] cannot be stored in GPTQ v1")
    codes = mod.codes().numpy().astype(np.int64)  # (out, in)
    out = {
        "qweight": torch.from_numpy(_pack_along_dim0(codes.T, bits)),
        # zeros (out, n_groups) -> packed along out -> (n_groups, out / p)
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
    with open(os.path.join(directory, "quantize_config.json"), "w") as f:
        json.dump(config, f, indent=2)
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
