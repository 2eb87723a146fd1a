"""Frame preprocessing and cached views (SPEC 3, 4).

A view turns the decoded frames of one video, uint8 `[T, H, W, 3]`, into the encoder's input,
float32 `[T, 3, crop, crop]`, in one batched pass over all T frames (no per-frame PIL images):
- `center`: resize the shorter side to `resize` (antialiased), center crop `crop`; the test view.
- `flip`: `center`, mirrored left-right.
- `crop<k>` (k = 0, 1, ...): resize, then a `crop` square at a seeded random position, the same
  position for every frame of the video (seed from `view_seed`, so it is the same in any
  process, rank or order).
Training clips (`train_augment`) use the releases' random crop and flip instead of a view;
`train_spatial` is the release rule with the draws given (flip, then a crop at x1, y1).
Values are scaled to [0, 1], then normalised with a mean/std (CLIP's unless given) when
`normalize` (the CLIP-SPM release feeds un-normalised [0, 1] frames: `normalize=False`).

The resize and crop rules are recipe fields, so each release's pixels can be reproduced
(golden/data_path README): `resize_mode` short_side (shorter side to `resize`, long side
`int(resize * long / short)`, nothing done when the shorter side already is `resize`) or squash
(both sides to `resize`, aspect ratio lost: CLIP-FSAR); `interpolation` bicubic / bilinear /
nearest (torchvision on uint8, antialiased), pil_bilinear (Pillow's `Image.resize(BILINEAR)`,
antialiased: bit-exact CLIP-SPM) or bilinear_float (`torch.nn.functional.interpolate` on the
[0, 1] floats, align_corners False, no antialias: CLIP-FSAR); `crop_offset` round_half_even
(Python's `round((W - crop) / 2)`, CLIP-SPM and torchvision) or floor (`(W - crop) // 2`,
CLIP-FSAR's fixed [16:240] at 256).
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

INTERPOLATIONS = {  # torchvision modes on uint8, antialiased
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
PIL_BILINEAR = "pil_bilinear"  # Pillow Image.resize(BILINEAR) per frame (antialiased)
FLOAT_BILINEAR = "bilinear_float"  # torch interpolate on [0, 1] floats, no antialias
INTERPOLATION_NAMES = (*INTERPOLATIONS, PIL_BILINEAR, FLOAT_BILINEAR)
RESIZE_MODES = ("short_side", "squash")
CROP_OFFSETS = ("round_half_even", "floor")
_VIEW_FORMS = "'center', 'flip', 'crop<k>' (k = 0, 1, ...), comma-separated, 'center' first"
_CROP_VIEW = re.compile(r"crop(\d+)")


@dataclass(frozen=True)
class Preprocess:
    """Resize/crop/normalisation recipe; part of a store's fingerprint."""

    resize: int = 224  # shorter side (short_side) or both sides (squash) after resizing
    crop: int = 224  # square crop side, pixels (<= resize)
    normalize: bool = True  # mean/std after scaling to [0, 1]
    interpolation: str = "bicubic"  # one of INTERPOLATION_NAMES
    resize_mode: str = "short_side"  # one of RESIZE_MODES
    crop_offset: str = "round_half_even"  # one of CROP_OFFSETS
    mean: tuple[float, float, float] = CLIP_MEAN  # per channel, used when normalize
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("interpolation", self.interpolation, INTERPOLATION_NAMES),
            ("resize_mode", self.resize_mode, RESIZE_MODES),
            ("crop_offset", self.crop_offset, CROP_OFFSETS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if not 1 <= self.crop <= self.resize:
            raise ValueError(
                f"need 1 <= crop <= resize, got crop={self.crop}, resize={self.resize}"
            )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"mean and std need 3 values each (std > 0), got {self.mean} and {self.std}"
            )

    @classmethod
    def from_recipe(cls, recipe: dict) -> Preprocess:
        """The Preprocess a store's recipe records (stores from before the pixel rules were
        recorded used the defaults)."""
        fields = ("resize", "crop", "normalize", "interpolation", "resize_mode", "crop_offset")
        kwargs = {name: recipe[name] for name in fields if recipe.get(name) is not None}
        for name in ("mean", "std"):
            if recipe.get(name) is not None:
                kwargs[name] = tuple(recipe[name])
        return cls(**kwargs)

    def recipe(self) -> dict:
        """The fields as they go into a store's recipe (and its fingerprint)."""
        return {
            "resize": self.resize,
            "crop": self.crop,
            "normalize": self.normalize,
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "crop_offset": self.crop_offset,
            "mean": list(self.mean) if self.normalize else None,
            "std": list(self.std) if self.normalize else None,
        }


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
    """Preprocess one video's frames for one view: exactly what the encoder sees.

    frames: uint8 `[T, H, W, 3]` RGB (numpy or torch, CPU or GPU).
    Returns float32 `[T, 3, crop, crop]` on the frames' device; deterministic in (frames, view,
    prep, seed). `seed` only matters for `crop<k>` views. The extraction runner and
    `fsar frames` both call this.
    """
    return model_input(crop_view(frames, view, prep, seed), prep)


def crop_view(
    frames: np.ndarray | torch.Tensor, view: str, prep: Preprocess, seed: int = 0
) -> torch.Tensor:
    """The pixels of one view before scaling: `[T, 3, crop, crop]`, uint8 (4x smaller than
    float, so DataLoader workers hand these over and the device does ``model_input``), or float32
    in [0, 1] for the float resize (``bilinear_float``), whose output is not rounded to bytes."""
    video = resize_frames(frames, prep)  # [T, 3, h, w]
    if view in ("center", "flip"):
        top, left = center_offsets(video.shape[-2:], prep)
        video = F.crop(video, top, left, prep.crop, prep.crop)
        if view == "flip":
            video = F.horizontal_flip(video)
    elif _CROP_VIEW.fullmatch(view):
        top, left = _crop_position(video.shape[-2:], prep.crop, seed)
        video = F.crop(video, top, left, prep.crop, prep.crop)
    else:
        raise ValueError(f"unknown view {view!r}; valid: {_VIEW_FORMS}")
    return video.contiguous()


def train_crop(
    frames: np.ndarray | torch.Tensor, prep: Preprocess, flip: bool, x1: int, y1: int
) -> torch.Tensor:
    """The releases' training spatial transform with its draws given: resize, then (when
    ``flip``) mirror, then a ``crop`` square at column ``x1``, row ``y1`` of the (mirrored) frame,
    the same window for every frame. CLIP-SPM draws flip, then x1, then y1 (golden
    `clipspm_train`); CLIP-FSAR supports use flip=False and x1, y1 in 0..31 on the 256 squash.
    Returns `[T, 3, crop, crop]` like ``crop_view`` (uint8, or float32 for ``bilinear_float``)."""
    video = resize_frames(frames, prep)
    height, width = video.shape[-2:]
    if not (0 <= y1 <= height - prep.crop and 0 <= x1 <= width - prep.crop):
        raise ValueError(
            f"crop at x1={x1}, y1={y1} does not fit a {prep.crop} square in {width}x{height}"
        )
    if flip:
        video = F.horizontal_flip(video)
    return F.crop(video, int(y1), int(x1), prep.crop, prep.crop).contiguous()


def train_augment(
    frames: np.ndarray | torch.Tensor, prep: Preprocess, generator: torch.Generator, flip: bool
) -> torch.Tensor:
    """The releases' training transform: resize, one random crop position for all frames of the
    video, and (when ``flip``) a mirror with probability 1/2. Draws 3 numbers from
    ``generator`` whatever ``flip`` is. Returns `[T, 3, crop, crop]` like ``crop_view``."""
    height, width = resized_size(_frame_size(frames), prep)
    draws = torch.rand(3, generator=generator, dtype=torch.float64)
    top = min(int(draws[0] * (height - prep.crop + 1)), height - prep.crop)
    left = min(int(draws[1] * (width - prep.crop + 1)), width - prep.crop)
    mirror = bool(flip and draws[2] < 0.5)
    # cropping at `left` then mirroring is mirroring then cropping at the mirrored column
    x1 = width - prep.crop - left if mirror else left
    return train_crop(frames, prep, mirror, x1, top)


def model_input(pixels: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """``crop_view`` / ``train_crop`` output -> the encoder's float32 input under ``prep``."""
    return to_model_input(pixels, prep.normalize, prep.mean, prep.std)


def to_model_input(
    pixels: torch.Tensor,
    normalize: bool,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """uint8 `[..., 3, H, W]` (or float32 already in [0, 1]) -> float32 in [0, 1], then
    ``(x - mean) / std`` per channel when ``normalize`` (float32, subtract then divide, as the
    releases)."""
    if pixels.dtype == torch.uint8:
        out = pixels.float().div_(255.0)
    else:
        out = pixels.to(torch.float32, copy=True)
    if normalize:
        mean_t = torch.tensor(tuple(mean), dtype=torch.float32, device=out.device).view(3, 1, 1)
        std_t = torch.tensor(tuple(std), dtype=torch.float32, device=out.device).view(3, 1, 1)
        out = out.sub_(mean_t).div_(std_t)
    return out


def resized_size(size: Sequence[int], prep: Preprocess) -> tuple[int, int]:
    """(height, width) after the resize rule, for a frame of size (height, width)."""
    height, width = int(size[0]), int(size[1])
    if prep.resize_mode == "squash":
        return prep.resize, prep.resize
    short, long = min(height, width), max(height, width)
    if short == prep.resize:
        return height, width
    new_long = int(prep.resize * long / short)  # truncated, as the releases and torchvision
    return (prep.resize, new_long) if height <= width else (new_long, prep.resize)


def center_offsets(size: Sequence[int], prep: Preprocess) -> tuple[int, int]:
    """(top, left) of the centre crop in a resized frame of size (height, width)."""
    height, width = int(size[0]), int(size[1])
    if prep.crop_offset == "floor":
        return (height - prep.crop) // 2, (width - prep.crop) // 2
    # Python's round() is round-half-to-even: 117 / 2 -> 58, 231 / 2 -> 116
    return int(round((height - prep.crop) / 2)), int(round((width - prep.crop) / 2))


def resize_frames(frames: np.ndarray | torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [T, 3, h, w] by ``prep``'s resize rule: uint8, or float32 in [0, 1]
    for ``bilinear_float``. Returns the frames unchanged (as [T, 3, H, W]) when the rule gives
    their own size."""
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # torch warns on read-only numpy memory
    video = torch.as_tensor(frames)
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 [T, H, W, 3], got {video.dtype} {tuple(video.shape)}"
        )
    height, width = resized_size(video.shape[1:3], prep)
    same = (height, width) == tuple(video.shape[1:3])
    if prep.interpolation == FLOAT_BILINEAR:
        video = video.permute(0, 3, 1, 2).float().div_(255.0)
        if same:
            return video
        return torch.nn.functional.interpolate(
            video, size=(height, width), mode="bilinear", align_corners=False, antialias=False
        )
    if same:
        return video.permute(0, 3, 1, 2)
    if prep.interpolation == PIL_BILINEAR:
        return _pil_resize(video, height, width)
    # The permuted input is channels-last in memory, which the uint8 resize kernels like; the
    # float math is ~8x faster on a contiguous [T, 3, crop, crop] layout (crop_view's output).
    return F.resize(
        video.permute(0, 3, 1, 2),
        [height, width],
        interpolation=INTERPOLATIONS[prep.interpolation],
        antialias=True,
    )


def _pil_resize(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's antialiased bilinear resize, frame by frame: the CLIP-SPM release's own call."""
    from PIL import Image

    frames = video.cpu().numpy()
    out = np.stack(
        [
            np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR))
            for frame in frames
        ]
    )
    return torch.from_numpy(out).to(video.device).permute(0, 3, 1, 2)


def _frame_size(frames: np.ndarray | torch.Tensor) -> tuple[int, int]:
    if frames.ndim != 4:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got shape {tuple(frames.shape)}")
    return int(frames.shape[1]), int(frames.shape[2])


def _crop_position(size: Sequence[int], crop: int, seed: int) -> tuple[int, int]:
    """Seeded (top, left) of a crop x crop window inside an image of size (h, w)."""
    height, width = int(size[0]), int(size[1])
    generator = torch.Generator().manual_seed(int(seed))
    top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
    return top, left
