"""Recipe fingerprints: one sha256 over everything that changes the cached numbers.

The recipe is a JSON-able dict (model, weights id, preprocessing, views, frame policy, T_cap,
layers, prompts, ...). Its canonical JSON (sorted keys, no whitespace, UTF-8, no NaN) is hashed;
library versions are recorded next to it but never hashed, so upgrading numpy does not orphan
a store.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from typing import Any

SCHEMA_VERSION = 1  # layout version of the store; bump when paths or dtypes change

# distributions whose versions are recorded in a store (looked up without importing them)
_VERSIONED = (
    "fsar",
    "numpy",
    "zarr",
    "h5py",
    "torch",
    "torchvision",
    "open_clip_torch",
    "decord",
    "av",
)


def _check_jsonable(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"recipe key {where}.{key!r} must be a str, got {type(key)}")
            _check_jsonable(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_jsonable(item, f"{where}[{i}]")
    elif value is not None and not isinstance(value, (str, bool, int, float)):
        raise TypeError(
            f"recipe value at {where} has type {type(value).__name__}; "
            f"only str, int, float, bool, None, list and dict are allowed"
        )


def canonical_json(recipe: dict[str, Any]) -> str:
    """The canonical JSON text of a recipe: sorted keys, compact, UTF-8, NaN rejected."""
    if not isinstance(recipe, dict):
        raise TypeError(f"recipe must be a dict, got {type(recipe).__name__}")
    _check_jsonable(recipe, "recipe")
    return json.dumps(
        recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def normalize_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe as it reads back from a store (tuples become lists, keys sorted)."""
    return json.loads(canonical_json(recipe))


def recipe_fingerprint(recipe: dict[str, Any]) -> str:
    """sha256 hex digest of ``canonical_json(recipe)``."""
    return hashlib.sha256(canonical_json(recipe).encode("utf-8")).hexdigest()


def flatten_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys to leaf values, e.g. ``{"preprocess.crop": 224}`` (empty dicts are leaves)."""
    out: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else key)
        else:
            out[prefix] = value

    walk(recipe, "")
    return out


def recipe_diff(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """One line per dotted recipe key whose value differs, e.g. ``model: 'RN50' -> 'ViT-B-16'``."""
    old = flatten_recipe(normalize_recipe(stored))
    new = flatten_recipe(normalize_recipe(requested))
    missing = "<absent>"
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            lines.append(f"{key}: {a!r} (store) vs {b!r} (requested)")
    return lines


def library_versions() -> dict[str, str]:
    """Versions of python and the libraries that produce or read stores ('-' if absent)."""
    versions = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "-"
    if versions["fsar"] == "-":
        from fsar import __version__

        versions["fsar"] = __version__
    return versions
