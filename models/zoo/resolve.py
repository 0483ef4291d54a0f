"""Zoo names -> model folders, for ``zoo:NAME`` wherever a model is accepted. Light: no torch import."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from advisor.models.errors import ModelNotFoundError, unknown_key_message
from advisor.models.zoo.build import DEFAULT_DIR, DEFAULT_SOURCE, is_present, model_dir
from advisor.models.zoo.configs import Recipe, default_recipes
from advisor.models.zoo.manifest import manifest_models


def zoo_names() -> list[str]:
    """Every zoo model (what ``zoo:all`` means): the manifest's models, then any recipe not yet recorded."""
    names = list(manifest_models())
    names += [n for n in default_recipes() if n not in names]
    return names


def recipe_for(name: str) -> Recipe:
    """The recorded recipe of ``name`` (manifest), or the code's recipe if the model was never recorded."""
    recorded = manifest_models().get(name)
    if recorded and recorded.get("recipe"):
        return Recipe.from_dict(recorded["recipe"])
    recipes = default_recipes()
    if name not in recipes:
        raise ModelNotFoundError(unknown_key_message("zoo model", name, zoo_names() + ["default"]))
    return recipes[name]


def _minutes(seconds: float) -> str:
    return f"about {max(1, round(seconds / 60))} min" if seconds >= 60 else f"about {max(1, round(seconds))} s"


def resolve_zoo_model(name: str) -> Path:
    """The folder of zoo model ``name`` (``default`` is the one embedded in the package).

    Raises:
        ModelNotFoundError: unknown name (with close matches), ``all`` (not one model), or a known
            model that is not trained on this machine yet (says which command builds it).
    """
    if name == "default":
        if not (DEFAULT_DIR / "model.safetensors").is_file():
            raise ModelNotFoundError(f"the embedded zoo:default model is missing from {DEFAULT_DIR}; the package "
                                     "is incomplete: reinstall it, or restore models/zoo/default from git")
        return DEFAULT_DIR
    if name == "all":
        raise ModelNotFoundError("zoo:all names every zoo model; this command takes one model, e.g. zoo:llama-s "
                                 "(see `advisor zoo list`)")
    names = zoo_names()
    if name not in names:
        raise ModelNotFoundError(unknown_key_message("zoo model", name, names + ["default"])
                                 + " See `advisor zoo list`.")
    folder = model_dir(name)
    if not is_present(folder):
        recorded = manifest_models().get(name, {})
        seconds = recorded.get("train_seconds") or recipe_for(name).estimated_seconds()
        raise ModelNotFoundError(f"zoo model {name!r} is not trained on this machine yet (looked in {folder}). "
                                 f"`advisor zoo train --name {name}` builds it ({_minutes(seconds)} on a 2-core CPU).")
    return folder


def zoo_entries() -> dict[str, str]:
    """``"zoo:<name>" -> one-line description`` for ``advisor ls models``, saying whether it is present."""
    recorded = manifest_models()
    out = {"zoo:default": f"embedded {DEFAULT_SOURCE} (llama-style, in the package): works offline with no training"}
    for name in zoo_names():
        m: dict[str, Any] = recorded.get(name, {})
        r = recipe_for(name)
        desc = f"zoo {r.family}-style, {r.size}"
        if m:
            desc += (f", {m['params'] / 1e6:.2f}M params ({m['non_embedding_params'] / 1e6:.2f}M non-embedding), "
                     f"{m['train_tokens'] / 1e6:.2f}M tokens, ppl {m['eval_ppl']:.2f} on stdlib-code")
        else:
            desc += f", {r.train_tokens / 1e6:.2f}M tokens"
        desc += " [present]" if is_present(model_dir(name)) else f" [not trained: advisor zoo train --name {name}]"
        out[f"zoo:{name}"] = desc
    return out
