"""The import direction kernels -> quantizers -> models -> probes -> advisor holds (docs/INTERFACES.md),
and every import of the project's own code goes through the ``advisor.`` namespace."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["kernels", "quantizers", "models", "probes", "advisor"]
LAYERS = ORDER[:-1]  # installed as advisor.<layer> from the folder <layer>/


def _layer(module: str) -> str | None:
    """The layer an absolute import belongs to: ``advisor.kernels.cpu`` -> kernels, ``advisor.api`` -> advisor."""
    parts = module.split(".")
    if parts[0] != "advisor":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "advisor"


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(layers imported, bare top-level names of a layer imported without ``advisor.``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "advisor":  # from advisor import kernels
                names += [f"advisor.{a.name}" for a in node.names]
    layers = {lay for n in names if (lay := _layer(n))}
    bare = {n.split(".")[0] for n in names} & set(LAYERS)
    return layers, bare


def _sources(*folders: str):
    for folder in folders:
        yield from (ROOT / folder).rglob("*.py")


def test_packages_import_only_leftwards():
    violations = []
    for i, pkg in enumerate(ORDER):
        forbidden = set(ORDER[i + 1 :])
        for path in _sources(pkg):
            bad = _imports(path)[0] & forbidden
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, "layering violated:\n" + "\n".join(violations)


def test_project_code_is_imported_through_the_advisor_namespace():
    """A bare ``import kernels`` would get whichever distribution owns that name (Hugging Face's ``kernels``)."""
    bare = [f"{p.relative_to(ROOT)} imports {sorted(b)}" for p in _sources(*ORDER, "tests", "benchmarks")
            if (b := _imports(p)[1])]
    assert not bare, "bare top-level imports:\n" + "\n".join(bare)


def test_product_does_not_depend_on_shared_folder():
    for path in _sources(*ORDER):
        assert "../shared" not in path.read_text(), f"{path} refers to ../shared"
