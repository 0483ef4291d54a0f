"""Save and load packed layers as one safetensors file (configs + metadata in its JSON header)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from .linear import QuantLinear

FORMAT = "advisor.kernels/1"


def _atomic_save(tensors: dict[str, torch.Tensor], path: str, header: dict[str, str]) -> None:
    from safetensors.torch import save_file

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)  # readers never see a half-written file
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_quantized(path: str, modules: dict[str, QuantLinear], metadata: dict[str, Any]) -> None:
    """Write every module's buffers as ``<name>.<buffer>`` plus their configs and ``metadata``.

    Args:
        path: target ``.safetensors`` file (written to a temp file, then ``os.replace``).
        modules: module name (e.g. ``model.layers.0.mlp.up_proj``) -> QuantLinear.
        metadata: JSON-serializable dict (spec, provenance, ...).
    """
    tensors = {}
    configs = {}
    for name, mod in modules.items():
        configs[name] = mod.config
        for key, buf in mod.state_dict().items():
            tensors[f"{name}.{key}"] = buf.detach().cpu().contiguous()
    header = {"format": FORMAT, "modules": json.dumps(configs, sort_keys=True),
              "metadata": json.dumps(metadata, sort_keys=True)}
    _atomic_save(tensors, path, header)


def load_quantized(path: str) -> tuple[dict[str, QuantLinear], dict[str, Any]]:
    """Inverse of :func:`save_quantized` -> (modules by name, metadata)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format={header.get('format')!r})")
        configs = json.loads(header["modules"])
        modules = {}
        for name, config in configs.items():
            mod = QuantLinear(config)
            state = {key: f.get_tensor(f"{name}.{key}") for key in mod.state_dict()}
            mod.load_state_dict(state)
            modules[name] = mod
    return modules, json.loads(header["metadata"])
