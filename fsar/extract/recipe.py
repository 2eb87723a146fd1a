"""The extraction recipe: every setting that changes the cached numbers, recorded in the store."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch

import fsar
from fsar.config import Config
from fsar.data.frames import FramePolicy
from fsar.data.transforms import CLIP_MEAN, CLIP_STD, Preprocess
from fsar.extract.encoders import Encoder

# 2: the pixel rules (resize mode and filter, crop offset, mean/std, frame-folder listing) and
# the encoder precision and feature dtype joined the recipe
RECIPE_VERSION = 2


def preprocess_from_config(config: Config, image_size: int) -> Preprocess:
    """The pixel recipe of ``config.extract`` for a model whose input is ``image_size``."""
    ex = config.extract
    crop = ex.crop or image_size
    return Preprocess(
        resize=ex.resize or round(crop * 256 / 224),
        crop=crop,
        normalize=ex.normalize,
        interpolation=ex.interpolation,
        resize_mode=ex.resize_mode,
        crop_offset=ex.crop_offset,
        mean=tuple(ex.mean) if ex.mean is not None else CLIP_MEAN,
        std=tuple(ex.std) if ex.std is not None else CLIP_STD,
    )


def effective_precision(config: Config, device: torch.device) -> str:
    """fp16 / bf16 autocast applies on GPU only; the CPU always encodes in float32."""
    return config.extract.precision if device.type == "cuda" else "fp32"


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
        **preprocess.recipe(),
        "frame_listing": ex.frame_listing,
        "views": list(views),
        "frames": ex.frames,
        "frame_policy": policy.kind,
        "seq_len": ex.seq_len,
        "t_cap": policy.t_cap,
        "min_frames": policy.min_frames,
        "layers": dict(layer_dims),
        "prompts": list(templates),
        "crop_seed": ex.seed if uses_random_crops else None,
        # autocast (GPU only) and the stored dtype change the numbers
        "precision": effective_precision(config, encoder.device),
        "feature_dtype": ex.feature_dtype,
    }


def library_versions() -> dict[str, str]:
    """Recorded beside the recipe (not in the fingerprint)."""
    return {
        "fsar": fsar.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
