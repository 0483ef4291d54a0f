"""Load an advisor native folder (:mod:`advisor.models.saving`) back as the packed model it was saved from.

The architecture comes from ``config.json``; every linear layer the file holds packed becomes that
``QuantLinear``, every other tensor is copied in from the file. The file must cover the model exactly:
a tensor the architecture expects and the file lacks, or one the file holds and the architecture has
no place for, is an error (never a randomly initialised weight, never an ignored tensor).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from advisor.models.errors import AdvisorError, ModelNotFoundError
from advisor.models.saving import MANIFEST, NATIVE_WEIGHTS, read_manifest


def native_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding advisor's native packed weights."""
    p = Path(path)
    return p.is_dir() and (p / NATIVE_WEIGHTS).is_file()


def _check_complete(folder: Path, name: str) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is None:
        raise ModelNotFoundError(f"model folder {name!r} holds {NATIVE_WEIGHTS} but no readable {MANIFEST}: it "
                                 "was not written completely by advisor; quantize again with --out")
    for rel, size in manifest["files"].items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != size:
            raise ModelNotFoundError(f"model folder {name!r} is incomplete or was changed after advisor wrote it "
                                     f"({rel} is {'missing' if not p.is_file() else 'a different size'}); "
                                     "quantize again with --out")
    return manifest


def _set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


def load_native(folder: str | Path, name: str, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """The packed model of a native folder as a :class:`advisor.models.loading.LoadedModel`.

    Raises:
        ModelNotFoundError: incomplete folder, unreadable weights, or tensors that do not match the
            architecture in ``config.json`` (each named).
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from advisor.kernels.io import load_quantized_file
    from advisor.models.adapters import get_adapter
    from advisor.models.loading import LoadedModel, ModelSource, _fingerprint, _weight_files

    folder = Path(folder)
    manifest = _check_complete(folder, name)
    weights = folder / NATIVE_WEIGHTS
    try:
        modules, tensors, meta = load_quantized_file(str(weights))
    except (ValueError, SafetensorError, OSError) as e:
        raise ModelNotFoundError(f"could not read the packed weights of {name!r} ({weights}): {e}") from e
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - config/tokenizer errors come in many types
        raise ModelNotFoundError(f"could not build the model of {name!r} from {folder / 'config.json'}: "
                                 f"{type(e).__name__}: {str(e)[:300]}") from e
    for path, mod in modules.items():
        try:
            old = model.get_submodule(path)
        except AttributeError:
            raise ModelNotFoundError(f"{weights}: packed layer {path} has no place in the architecture of "
                                     f"{folder / 'config.json'}") from None
        if (getattr(old, "in_features", None), getattr(old, "out_features", None)) != (mod.in_features,
                                                                                     mod.out_features):
            raise ModelNotFoundError(f"{weights}: packed layer {path} is {mod.out_features}x{mod.in_features}, "
                                     f"the architecture's is {getattr(old, 'out_features', '?')}x"
                                     f"{getattr(old, 'in_features', '?')}")
        _set_module(model, path, mod)
    aliases: dict[str, str] = dict(meta.get("aliases") or {})
    prefixes = tuple(f"{p}." for p in modules)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    missing = sorted(k for k in state if k not in tensors and k not in aliases)
    unexpected = sorted(k for k in tensors if k not in state)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) ({', '.join(unexpected[:3])})")
        raise ModelNotFoundError(f"{weights} does not match the architecture in config.json: "
                                 f"{'; '.join(parts)}. Quantize again with --out")
    with torch.no_grad():
        for key, target in state.items():
            src = tensors.get(key)
            if src is None:
                src = tensors.get(aliases[key])
                if src is None:
                    raise ModelNotFoundError(f"{weights}: {key} is tied to {aliases[key]}, which is missing")
                if target.data_ptr() == state[aliases[key]].data_ptr():
                    continue  # already tied by the architecture
            if tuple(src.shape) != tuple(target.shape):
                raise ModelNotFoundError(f"{weights}: {key} has shape {tuple(src.shape)}, the architecture "
                                         f"expects {tuple(target.shape)}")
            target.copy_(src.to(target.dtype))
    model.eval().to(device)
    files = _weight_files(folder)
    fp = _fingerprint(files, {"kind": "native", "target": folder.name})
    source = ModelSource(name=name, kind="native", resolved=str(folder), fingerprint=fp,
                         notes=(f"packed model ({meta.get('spec', '?')}) saved by advisor",))
    return LoadedModel(model=model, tokenizer=tok, adapter=get_adapter(model), source=source,
                       info={"packed": True, "spec": meta.get("spec"), "manifest": manifest})
