"""The extraction recipe: every setting that changes the cached numbers, recorded in the store."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch

import fsar
from fsar.config import Config
from fsar.data.frames import FramePolicy
from fsar.data.transforms import Preprocess
from fsar.extract.encoders import Encoder

RECIPE_VERSION = 1


def build_recipe(
    config: Config,
    encoder: Encoder,
    policy: FramePolicy,
    views: Sequence[str],
    preprocess: Preprocess,
    templates: Sequence[str],
    layer_dims: dict[str, int],
) -> dict:
    """JSON-able dict; the store's fingerprint is a hash of it, so keep versions out of it."""
    ex = config.extract
    uses_random_crops = any(view.startswith("crop") for view in views)
    return {
        "recipe_version": RECIPE_VERSION,
        "dataset": config.dataset.name,
        "model": encoder.spec.model,
        "weights": encoder.weights_id,
        "quick_gelu": encoder.quick_gelu,
        "image_size": encoder.image_size,
        "resize": preprocess.resize,
        "crop": preprocess.crop,
        "normalize": preprocess.normalize,
        "interpolation": preprocess.interpolation,
        "views": list(views),
        "frames": ex.frames,
        "frame_policy": policy.kind,
        "seq_len": ex.seq_len,
        "t_cap": policy.t_cap,
        "min_frames": policy.min_frames,
        "layers": dict(layer_dims),
        "prompts": list(templates),
        "crop_seed": ex.seed if uses_random_crops else None,
        # GPU extraction runs under float16 autocast, CPU in float32: different numbers.
        "precision": "autocast-float16" if encoder.device.type == "cuda" else "float32",
    }


def library_versions() -> dict[str, str]:
    """Recorded beside the recipe (not in the fingerprint)."""
    return {
        "fsar": fsar.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
