"""The releases' training-time pixel augmentation, for end-to-end fine-tuning (``fsar finetune``).

golden/data_path/README.md states the rules; one draw set serves every frame of a clip:

- CLIP-SPM (``clipspm_train_clip``): resize, then a horizontal flip with p = 0.5 (no flip and no
  draw on SSv2), then a random crop ``x1 ~ randint(0, W'-crop)``, then ``y1 ~ randint(0,
  H'-crop)``. The flip comes first, so x1 is measured in the mirrored frame.
- CLIP-FSAR (``clipfsar_train_clip``): squash every frame to ``size x size`` (bilinear, no
  antialias, aspect not kept), crop at ``x = int(uniform(0, size-crop))`` then ``y`` likewise.
  Kinetics-100 *queries* only: a flip with p = 0.5 on the decoded frames before the squash, and
  the colour jitter after the crop (brightness, contrast, saturation ~ U[0.5, 1.5], hue ~
  U[-0.25, 0.25], shuffled order, grayscale first with p = 0.3). Supports are never flipped.

Draws come from a ``numpy.random.Generator`` in the release's order. The resizes are the
preset's own (``fsar.data.transforms``), so a fine-tuned run sees the pixels extraction encodes.
CLIP-SPM clips are ``train_crop``'s (uint8); CLIP-FSAR clips are float32 in [0, 1] (the squash
and the jitter are float operations, so no uint8 rounding); ``model_input`` takes both.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from fsar.data.transforms import Preprocess, _frame_size, resize_frames, resized_size, train_crop


def clipspm_train_clip(
    frames: np.ndarray, prep: Preprocess, rng: np.random.Generator, flip: bool
) -> torch.Tensor:
    """CLIP-SPM's training clip: uint8 [T, H, W, 3] -> [T, 3, crop, crop] as ``train_crop``
    gives it (uint8 under the release's Pillow bilinear)."""
    height, width = resized_size(_frame_size(frames), prep)
    mirror = bool(flip and rng.random() < 0.5)
    x1 = int(rng.integers(0, width - prep.crop + 1))
    y1 = int(rng.integers(0, height - prep.crop + 1))
    return train_crop(frames, prep, mirror, x1, y1)


def clipfsar_train_clip(
    frames: np.ndarray, prep: Preprocess, rng: np.random.Generator, k100_query: bool
) -> torch.Tensor:
    """CLIP-FSAR's training clip: uint8 [T, H, W, 3] -> float32 [T, 3, crop, crop] in [0, 1].

    The resize is ``prep``'s (the release preset: squash to 256x256, float bilinear without
    antialias); Kinetics-100 queries are mirrored on the decoded frames, before it."""
    if k100_query and rng.random() < 0.5:
        frames = np.ascontiguousarray(np.asarray(frames)[:, :, ::-1])
    video = resize_frames(frames, prep)  # [T, 3, H', W']
    if video.dtype == torch.uint8:
        video = video.float().div_(255.0)
    height, width = video.shape[-2:]
    x = int(rng.uniform(0, width - prep.crop))
    y = int(rng.uniform(0, height - prep.crop))
    video = video[..., y : y + prep.crop, x : x + prep.crop]
    if k100_query:
        video = color_jitter(video, rng)
    return video.contiguous()


def color_jitter(video: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The release's query colour jitter on float [T, 3, H, W] in [0, 1], one draw set per clip.

    Draw order: brightness, contrast, saturation, hue, the order of the four, then the
    grayscale coin (applied first when it lands below 0.3). The adjustments are torchvision's.
    """
    brightness, contrast, saturation = (float(rng.uniform(0.5, 1.5)) for _ in range(3))
    hue = float(rng.uniform(-0.25, 0.25))
    order = rng.permutation(4)
    if rng.uniform(0, 1) < 0.3:
        video = F.rgb_to_grayscale(video, num_output_channels=3)
    steps = (
        lambda v: F.adjust_brightness(v, brightness),
        lambda v: F.adjust_contrast(v, contrast),
        lambda v: F.adjust_saturation(v, saturation),
        lambda v: F.adjust_hue(v, hue),
    )
    for step in order:
        video = steps[int(step)](video)
    return video.clamp(0.0, 1.0)
