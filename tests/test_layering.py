"""The import direction kernels -> quantizers -> models -> probes -> advisor holds (ARCHITECTURE.md §1)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["kernels", "quantizers", "models", "probes", "advisor"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_packages_import_only_leftwards():
    violations = []
    for i, pkg in enumerate(ORDER):
        forbidden = set(ORDER[i + 1 :])
        for path in (ROOT / pkg).rglob("*.py"):
            bad = _imports(path) & forbidden
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, "layering violated:\n" + "\n".join(violations)


def test_product_does_not_depend_on_shared_folder():
    for pkg in ORDER:
        for path in (ROOT / pkg).rglob("*.py"):
            assert "../shared" not in path.read_text(), f"{path} refers to ../shared"
