"""Build zoo models: train, save, evaluate, and (for maintainers) record the results in the package.

Each model lands in ``advisor_home()/zoo/<name>/`` as a self-contained Hugging Face folder with
``recipe.json``, ``train_log.json`` and ``result.json`` (the measured numbers, the manifest entry).
Building is resumable: a model whose folder is complete is skipped unless ``force``. Several models
can train at once in separate single-threaded processes (``jobs``); each result is the same as when
built alone, because a recipe fixes its own thread count.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterable

from advisor.models.zoo.configs import Recipe
from advisor.models.zoo.manifest import MANIFEST_PATH, load_manifest, manifest_models, record

log = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_SOURCE = "llama-xs"  # the smallest llama-style model is the embedded default
_DEFAULT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "recipe.json", "train_log.json", "result.json")


def zoo_dir() -> Path:
    from advisor.models.paths import advisor_home

    return advisor_home() / "zoo"


def model_dir(name: str) -> Path:
    return zoo_dir() / name


def is_present(folder: Path) -> bool:
    """A complete model folder: weights, config, tokenizer and the measured result."""
    return all((Path(folder) / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json", "result.json"))


def read_result(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "result.json").read_text())


def _weights_sha256(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def build_one(recipe: Recipe, force: bool = False, progress: bool = True, position: int = 0,
              threads: int | None = None, out: Path | None = None) -> dict[str, Any]:
    """Train (unless present), save, evaluate one model; returns its manifest entry (+ ``status``, ``path``)."""
    from advisor.models.zoo.manifest import evaluate_folder, protocol_block, python_version, unigram_ppl
    from advisor.models.zoo.bpe import load_tokenizer, tokenizer_sha256
    from advisor.models.zoo.train import corpus_token_ids, save_model, train

    folder = Path(out) if out is not None else model_dir(recipe.name)
    if is_present(folder) and not force:
        return dict(read_result(folder), status="present", path=str(folder))
    tok_sha = tokenizer_sha256()
    if recipe.tokenizer_sha256 and recipe.tokenizer_sha256 != tok_sha:
        from advisor.models.errors import AdvisorError

        raise AdvisorError(f"{recipe.name}: recipe tokenizer {recipe.tokenizer_sha256[:12]} != committed {tok_sha[:12]}")
    from dataclasses import replace

    recipe = replace(recipe, tokenizer_sha256=tok_sha)
    result = train(recipe, progress=progress, position=position, threads=threads)
    save_model(result, folder)
    measured = evaluate_folder(folder)
    windows = measured.pop("_windows")
    train_ids, train_sha = corpus_token_ids(recipe.data, load_tokenizer())
    uni = unigram_ppl(train_ids, windows.ids, recipe.vocab_size)
    entry = {
        "name": recipe.name, "family": recipe.family, "size": recipe.size, "variant": recipe.variant,
        "params": measured["params"], "non_embedding_params": measured["non_embedding_params"],
        "train_tokens": result.tokens, "train_seconds": round(result.seconds, 1),
        "eval_ppl": round(measured["eval_ppl"], 4), "eval_nll": round(measured["eval_nll"], 6),
        "unigram_ppl": round(uni, 4), "seed": recipe.seed, "final_train_loss": round(result.final_loss, 5),
        "command": f"advisor zoo train --name {recipe.name}", "python": python_version(),
        "eval_text_sha256": measured["eval_text_sha256"], "threads": result.info["threads"],
        "weights_sha256": _weights_sha256(folder), "recipe": recipe.to_dict(),
    }
    (folder / "result.json").write_text(json.dumps(entry, indent=2) + "\n")
    protocol = protocol_block(measured["eval_text_sha256"], train_sha, tok_sha, round(uni, 4))
    return dict(entry, status="trained", path=str(folder), _protocol=protocol)


def _worker(recipe: Recipe, force: bool, progress: bool, position: int, threads: int | None) -> dict[str, Any]:
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    return build_one(recipe, force=force, progress=progress, position=position, threads=threads)


def build(recipes: Iterable[Recipe], force: bool = False, jobs: int = 1, progress: bool = True,
          threads: int | None = None, write_manifest: bool = False, manifest_path: Path = MANIFEST_PATH,
          on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Build several models, in order, or ``jobs`` at a time in separate processes.

    Args:
        write_manifest: record every trained model in the package manifest (and refresh the embedded
            default when its source model was trained). For maintainers building the committed zoo.
        on_result: called with each finished entry (the CLI prints progress lines with it).
    """
    from advisor.models.zoo.configs import default_recipes

    recipes = list(recipes)
    order = list(default_recipes())
    results: list[dict[str, Any]] = []

    def finish(entry: dict[str, Any]) -> None:
        protocol = entry.pop("_protocol", None)
        # a present model is recorded too if the manifest lacks it (a build killed between saving and
        # recording) or holds other weights
        recorded = manifest_models(load_manifest(manifest_path)).get(entry["name"], {})
        if write_manifest and (entry["status"] == "trained"
                               or recorded.get("weights_sha256") != entry.get("weights_sha256")):
            clean = {k: v for k, v in entry.items() if k not in ("status", "path")}
            record(clean, protocol, path=manifest_path, order=order)
            if entry["name"] == DEFAULT_SOURCE:
                embed_default(Path(entry["path"]))
        results.append(entry)
        if on_result:
            on_result(entry)

    if jobs <= 1 or len(recipes) <= 1:
        for r in recipes:
            finish(build_one(r, force=force, progress=progress, threads=threads))
        return results
    import multiprocessing as mp

    # even slots take the longest job left, odd slots the shortest: small models are usable early
    # while the long ones still finish close to the optimal makespan
    todo = sorted(recipes, key=lambda r: -r.estimated_seconds())
    free_slots = list(range(jobs))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        running: dict[Any, int] = {}
        while todo or running:
            while todo and free_slots:
                slot = free_slots.pop(0)
                recipe = todo.pop(0) if slot % 2 == 0 else todo.pop()
                running[pool.submit(_worker, recipe, force, progress, slot, threads)] = slot
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                free_slots.append(running.pop(fut))
                finish(fut.result())
    return results


def embed_default(folder: Path, dest: Path = DEFAULT_DIR) -> Path:
    """Copy a trained model folder into the package as the embedded ``zoo:default`` (keeps ``__init__.py``)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in _DEFAULT_FILES:
        src = Path(folder) / name
        if src.is_file():
            shutil.copyfile(src, dest / name)
    return dest
