"""Head checkpoints: atomic writes, ``weights_only`` reads, and what they record.

A checkpoint holds only tensors and plain Python values (no pickled classes), so it loads with
``torch.load(weights_only=True)``: the head and optimizer state, the step, every random state
needed for an exact resume, the full config, the protocol and the training store's recipe.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fsar.torch_files import CheckpointError, load_torch_file

FORMAT = "fsar-heads/1"
# Recipe keys that must agree between the store a head was trained on and one it is evaluated
# on: the same encoder and the same pixels in (the dataset and split may differ).
ENCODER_KEYS = ("model", "weights", "quick_gelu", "image_size", "resize", "crop", "normalize")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({"format": FORMAT, **payload}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


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
    return {key: recipe.get(key) for key in ENCODER_KEYS}


def expected_encoder(checkpoint: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """The encoder recipe of the stores this checkpoint's head can be scored on.

    Frozen-feature runs: their training store's. Fine-tuning runs: a store re-extracted with
    ``--checkpoint path``, whose weights id names the base weights and this file's sha256.
    """
    trained = dict(checkpoint["store"]["encoder"])
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
    diff = {k: (trained[k], here[k]) for k in ENCODER_KEYS if trained.get(k) != here.get(k)}
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
