"""`pip install fsar` installs what fsar imports, and nothing it does not."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from .conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

# Imports that name a module of another distribution than their top-level package says.
SUBMODULE_DISTRIBUTIONS = {"torch.utils.tensorboard": "tensorboard"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules(path: Path) -> set[str]:
    """Absolute imports of one file, as dotted module names (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imported_distributions() -> dict[str, set[str]]:
    """{distribution: files importing it} over every module of the fsar package."""
    top_level = metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "fsar").rglob("*.py")):
        for module in _imported_modules(path):
            root = module.split(".")[0]
            if root == "fsar" or root in sys.stdlib_module_names or root == "__future__":
                continue
            if module in SUBMODULE_DISTRIBUTIONS:
                dist = SUBMODULE_DISTRIBUTIONS[module]
            else:
                assert root in top_level, f"{path}: no installed distribution provides {root!r}"
                dist = top_level[root][0]
            found.setdefault(_normalise(dist), set()).add(str(path.relative_to(REPO)))
    return found


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {_normalise(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]) for req in requirements}

    extras = {k: names(v) for k, v in project["optional-dependencies"].items() if k != "dev"}
    return names(project["dependencies"]), extras


def test_declared_dependencies_are_exactly_the_third_party_imports():
    imported = imported_distributions()
    required, extras = declared()
    optional = set().union(*extras.values())
    missing = sorted(set(imported) - required - optional)
    unused = sorted((required | optional) - set(imported))
    assert not missing, f"imported but not declared: {[(d, imported[d]) for d in missing]}"
    assert not unused, f"declared but imported nowhere in fsar/: {unused}"
    assert required.isdisjoint(optional)
    # the findings that started this test: reports need matplotlib; nothing uses einops
    # (joblib, unused then, runs the grid points of fsar ablate in parallel since issue 14)
    assert "matplotlib" in required and "einops" not in required | optional


def test_optional_dependencies_are_only_imported_where_their_absence_is_handled():
    """fsar must run without an extra: each import of one sits in a try/except ImportError."""
    _, extras = declared()
    optional = set().union(*extras.values())
    top_level = metadata.packages_distributions()
    for path in sorted((REPO / "fsar").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers
            ):
                for inner in node.body:
                    for sub in ast.walk(inner):
                        if isinstance(sub, (ast.Import, ast.ImportFrom)):
                            guarded.add(id(sub))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            modules = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            for module in modules:
                if not module or (isinstance(node, ast.ImportFrom) and node.level):
                    continue
                root = module.split(".")[0]
                dist = SUBMODULE_DISTRIBUTIONS.get(module) or (top_level.get(root) or [root])[0]
                if _normalise(dist) in optional:
                    assert id(node) in guarded, f"{path}:{node.lineno} imports optional {dist}"
