"""Frame preprocessing and cached views (SPEC 3, 4).

A view turns the decoded frames of one video, uint8 `[T, H, W, 3]`, into the encoder's input,
float32 `[T, 3, crop, crop]`, in one batched pass over all T frames (no per-frame PIL images):
- `center`: resize the shorter side to `resize` (antialiased), center crop `crop`; the test view.
- `flip`: `center`, mirrored left-right.
- `crop<k>` (k = 0, 1, ...): resize, then a `crop` square at a seeded random position, the same
  position for every frame of the video (seed from `view_seed`, so it is the same in any
  process, rank or order).
Training clips (`train_augment`) use the releases' random crop and flip instead of a view.
Values are scaled to [0, 1], then normalised with CLIP's mean/std when `normalize` (the CLIP-SPM
release feeds un-normalised [0, 1] frames: `normalize=False`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from fsar.config import ConfigError

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
_VIEW_FORMS = "'center', 'flip', 'crop<k>' (k = 0, 1, ...), comma-separated, 'center' first"
_CROP_VIEW = re.compile(r"crop(\d+)")


@dataclass(frozen=True)
class Preprocess:
    """Resize/crop/normalisation recipe; part of a store's fingerprint."""

    resize: int = 224  # shorter side after resizing, pixels
    crop: int = 224  # square crop side, pixels (<= resize)
    normalize: bool = True  # CLIP mean/std after scaling to [0, 1]
    interpolation: str = "bicubic"  # one of INTERPOLATIONS

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}"
            )
        if not 1 <= self.crop <= self.resize:
            raise ValueError(
                f"need 1 <= crop <= resize, got crop={self.crop}, resize={self.resize}"
            )


def parse_views(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'center,flip,crop0,crop1' (or a sequence of names) -> ('center', 'flip', 'crop0', 'crop1').

    'center' is required and comes first; duplicates and unknown names are errors.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(name).strip() for name in names if str(name).strip()]
    for name in names:
        if name not in ("center", "flip") and not _CROP_VIEW.fullmatch(name):
            raise ConfigError(f"unknown view {name!r}; valid: {_VIEW_FORMS}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"views listed twice: {duplicates}; valid: {_VIEW_FORMS}")
    if "center" not in names:
        raise ConfigError(f"views {names} lack 'center' (the test view); valid: {_VIEW_FORMS}")
    return ("center", *[name for name in names if name != "center"])


def view_seed(base_seed: int, video_id: str, view: str) -> int:
    """A seed in [0, 2**63) for one video's view, from sha256 (stable across runs/processes)."""
    digest = hashlib.sha256(f"{int(base_seed)}\x00{video_id}\x00{view}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def apply_view(
    frames: np.ndarray | torch.Tensor, view: str, prep: Preprocess, seed: int = 0
) -> torch.Tensor:
    """Preprocess one video's frames for one view.

    frames: uint8 `[T, H, W, 3]` RGB (numpy or torch, CPU or GPU).
    Returns float32 `[T, 3, crop, crop]` on the frames' device; deterministic in (frames, view,
    prep, seed). `seed` only matters for `crop<k>` views.
    """
    return to_model_input(crop_view(frames, view, prep, seed), prep.normalize)


def crop_view(
    frames: np.ndarray | torch.Tensor, view: str, prep: Preprocess, seed: int = 0
) -> torch.Tensor:
    """The pixels of one view before scaling: uint8 `[T, 3, crop, crop]` (4x smaller than float,
    so DataLoader workers hand these over and the device does ``to_model_input``)."""
    video = _resized(frames, prep)  # [T, 3, h, w]
    if view in ("center", "flip"):
        video = F.center_crop(video, [prep.crop, prep.crop])
        if view == "flip":
            video = F.horizontal_flip(video)
    elif _CROP_VIEW.fullmatch(view):
        top, left = _crop_position(video.shape[-2:], prep.crop, seed)
        video = F.crop(video, top, left, prep.crop, prep.crop)
    else:
        raise ValueError(f"unknown view {view!r}; valid: {_VIEW_FORMS}")
    return video.contiguous()


def train_augment(
    frames: np.ndarray | torch.Tensor, prep: Preprocess, generator: torch.Generator, flip: bool
) -> torch.Tensor:
    """The releases' training transform: resize, one random crop position for all frames of the
    video, and (when ``flip``) a mirror with probability 1/2. Draws 3 numbers from
    ``generator`` whatever ``flip`` is. Returns uint8 `[T, 3, crop, crop]`."""
    video = _resized(frames, prep)
    height, width = video.shape[-2:]
    draws = torch.rand(3, generator=generator, dtype=torch.float64)
    top = min(int(draws[0] * (height - prep.crop + 1)), height - prep.crop)
    left = min(int(draws[1] * (width - prep.crop + 1)), width - prep.crop)
    video = F.crop(video, top, left, prep.crop, prep.crop)
    if flip and draws[2] < 0.5:
        video = F.horizontal_flip(video)
    return video.contiguous()


def to_model_input(pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
    """uint8 `[..., 3, H, W]` -> float32 in [0, 1], then CLIP mean/std when ``normalize``."""
    out = pixels.float().div_(255.0)
    if normalize:
        mean = torch.tensor(CLIP_MEAN, device=out.device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, device=out.device).view(3, 1, 1)
        out = out.sub_(mean).div_(std)
    return out


def _resized(frames: np.ndarray | torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, h, w] with min(h, w) = prep.resize (antialiased)."""
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # torch warns on read-only numpy memory
    video = torch.as_tensor(frames)
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 [T, H, W, 3], got {video.dtype} {tuple(video.shape)}"
        )
    # The permuted input is channels-last in memory, which the uint8 resize kernels like; the
    # float math is ~8x faster on a contiguous [T, 3, crop, crop] layout (crop_view's output).
    video = video.permute(0, 3, 1, 2)
    return F.resize(
        video, [prep.resize], interpolation=INTERPOLATIONS[prep.interpolation], antialias=True
    )


def _crop_position(size: Sequence[int], crop: int, seed: int) -> tuple[int, int]:
    """Seeded (top, left) of a crop x crop window inside an image of size (h, w)."""
    height, width = int(size[0]), int(size[1])
    generator = torch.Generator().manual_seed(int(seed))
    top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
    return top, left
