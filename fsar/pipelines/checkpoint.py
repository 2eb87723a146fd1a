"""Head checkpoints: atomic writes, ``weights_only`` reads, and what they record.

A checkpoint holds only tensors and plain Python values (no pickled classes), so it loads with
``torch.load(weights_only=True)``: the head and optimizer state, the step, every random state
needed for an exact resume, the full config, the protocol and the training store's recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fsar.atomic import atomic_file, clean_partial
from fsar.data.transforms import Preprocess
from fsar.torch_files import CheckpointError, load_torch_file

FORMAT = "fsar-heads/1"
# Recipe keys that must agree between the store a head was trained on and one it is evaluated
# on: the same encoder and the same pixels in (the dataset and split may differ).
PIXEL_KEYS = (
    "resize", "crop", "normalize", "interpolation", "resize_mode", "crop_offset", "mean", "std"
)  # fmt: skip
ENCODER_KEYS = ("model", "weights", "quick_gelu", "image_size", *PIXEL_KEYS, "frame_listing")


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, no permission, ...); the file is unchanged."""


class NonFiniteWeights(CheckpointError):
    """A state holds NaN or infinite values: it is not written, and not scored."""


def non_finite_entries(tree: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) payload holding NaN or inf."""
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() and not bool(torch.isfinite(tree).all())
        return [prefix] if bad else []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    found = []
    for key, value in items:
        found += non_finite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a reader sees the old file or the new one.

    A payload with a non-finite tensor is refused (``NonFiniteWeights``) before anything is
    written; an ``OSError`` (a full disk) leaves the old file and no temporary file behind.
    """
    path = Path(path)
    bad = non_finite_entries(payload)
    if bad:
        raise NonFiniteWeights(
            f"not writing {path}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:3])})"
        )
    try:
        _write_atomic(path, payload)
    except OSError as err:
        raise CheckpointWriteError(
            f"cannot write {path}: {err.strerror or err}; the previous {path.name} is unchanged"
        ) from err


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    with atomic_file(path) as file:
        torch.save({"format": FORMAT, **payload}, file)


def clean_partial_writes(folder: Path) -> list[Path]:
    """Remove the temporary files of checkpoint writes that a kill cut short."""
    return clean_partial(folder, "*.pt")


def load_checkpoint(
    path: Path | str, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """An fsar head checkpoint, read with ``weights_only=True``; anything else is refused with
    the reason in one line. ``mmap``: map instead of read (to look at a few fields only)."""
    path = Path(path)
    payload = load_torch_file(path, "checkpoint", map_location, mmap=mmap)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an fsar checkpoint (format {FORMAT}); an official CLIP-SPM / "
            "CLIP-FSAR checkpoint is passed with --official (eval.official)"
        )
    return payload


def check_requested_head(path: Path | str, head: str | None) -> None:
    """The checkpoint decides the head it is scored with; an explicit ``--head`` naming another
    head is refused (naming both) rather than silently ignored."""
    if head is None:
        return
    payload = load_checkpoint(path, mmap=True)
    saved = payload["config"]["head"]["name"]
    if saved != head:
        raise CheckpointError(
            f"{path} holds a {saved} head (trained on D={payload['feature_dim']} features), but "
            f"--head {head} was requested: pass --head {saved}, or leave --head out (the "
            "checkpoint decides it)"
        )


def encoder_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The encoder and pixel fields of a recipe; recipes from before the pixel rules were
    recorded read back as the defaults they were made with, so old and new compare."""
    pixels = Preprocess.from_recipe(recipe).recipe()
    return {
        **{key: recipe.get(key) for key in ENCODER_KEYS},
        **{key: pixels[key] for key in PIXEL_KEYS},
        "frame_listing": recipe.get("frame_listing") or "natural_images",
    }


def expected_encoder(checkpoint: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """The encoder recipe of the stores this checkpoint's head can be scored on.

    Frozen-feature runs: their training store's. Fine-tuning runs: a store re-extracted with
    ``--checkpoint path``, whose weights id names the base weights and this file's sha256.
    """
    trained = encoder_recipe(checkpoint["store"]["encoder"])
    if checkpoint.get("regime") == "e2e":
        from fsar.extract.encoders import file_sha256

        trained["weights"] = (
            f"{checkpoint['encoder']['text_weights']}"
            f"+visual-from-checkpoint-sha256:{file_sha256(path)}"
        )
    return trained


def check_store_fits(
    checkpoint: dict[str, Any], recipe: dict[str, Any], store: Path, path: Path | str
) -> None:
    """Refuse a store whose encoder or preprocessing differs from the one the head saw."""
    trained = expected_encoder(checkpoint, path)
    here = encoder_recipe(recipe)
    diff = {k: (trained[k], here[k]) for k in ENCODER_KEYS if trained[k] != here[k]}
    if diff:
        lines = ", ".join(f"{k}: trained {a!r} vs store {b!r}" for k, (a, b) in diff.items())
        if checkpoint.get("regime") == "e2e":
            fix = f"re-extract it with `fsar extract --checkpoint {path}` (same model and weights)"
        else:
            fix = f"evaluate on a store extracted like {checkpoint['store']['path']}"
        raise CheckpointError(
            f"{store} was extracted with another encoder or preprocessing than the one this "
            f"head was trained with ({lines}); {fix}"
        )
