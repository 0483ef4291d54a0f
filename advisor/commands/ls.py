"""`advisor ls models|dtypes|methods|probes|datasets`: the registries, one line per entry."""
from __future__ import annotations

import argparse

KINDS = ("models", "dtypes", "methods", "probes", "datasets")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS, help="which registry to list")
    p.add_argument("--json", action="store_true", help="print a JSON object name -> description")


def entries(kind: str) -> dict[str, str]:
    """Registry entries of one kind: name -> one-line description."""
    if kind == "models":
        from advisor.models.registry import ALIASES

        out = {name: f"{a.description} [{a.target}]" for name, a in ALIASES.items()}
        try:
            from advisor.models.zoo import zoo_entries

            out.update(zoo_entries())
        except ImportError:
            pass
        out["<org/name>"] = "any Hugging Face causal LM id in the local cache (or online)"
        out["<folder>"] = "a local Hugging Face model folder (config.json + safetensors)"
        out["<file.gguf>"] = "a GGUF file, dequantized to float on load"
        return out
    if kind == "dtypes":
        from advisor.quantizers import DTYPES

        return {name: d.description for name, d in DTYPES.items()}
    if kind == "methods":
        from advisor.quantizers import METHODS

        return {name: m.description for name, m in METHODS.items()}
    if kind == "probes":
        from advisor.probes import PROBES

        return {name: p.description for name, p in PROBES.items()}
    from advisor.models.data import DATASETS

    return dict(DATASETS)


def run(args: argparse.Namespace) -> int:
    from advisor.cli import emit_json

    items = entries(args.kind)
    if args.json:
        emit_json(items)
        return 0
    width = max(len(k) for k in items)
    for name, desc in items.items():
        print(f"{name:<{width}}  {desc}")
    return 0
