"""``fsar frames``: what the encoder sees for chosen videos under a config, without weights.

For each video the source frame indices and the float32 encoder input ``[T, 3, H, W]`` are
written to one ``.npz`` (keys ``<video id>.indices`` / ``<video id>.pixels``; other cached views
as ``<video id>.<view>.pixels``; with ``draws`` K, ``<video id>.draw<k>.indices`` / ``.pixels``),
plus a PNG contact sheet (one row per video and draw, one column per frame, de-normalised).
The pixels come from ``fsar.extract.decode.encoder_input``, the function the extraction runner
encodes, so the file is a faithful view of extraction.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from fsar.atomic import write_atomic
from fsar.config import Config, ConfigError
from fsar.data.datasets import dataset_from_config
from fsar.data.frames import FramePolicy, parse_frame_policy, select_frames
from fsar.data.release_frames import release_indices, resolve_rule
from fsar.data.transforms import Preprocess, parse_views, view_seed
from fsar.data.video import open_source
from fsar.extract.decode import encoder_input
from fsar.extract.encoders import EncoderError, register_tiny_configs
from fsar.extract.recipe import preprocess_from_config

SHEET_GAP = 2  # pixels between cells of the contact sheet
SHEET_LABEL = 14  # height of the text strip above each row


@dataclass
class FramesDump:
    npz: Path
    sheet: Path
    rows: list[tuple[str, list[int]]]  # (row label, source frame indices) per sheet row
    input_size: int  # H = W of the encoder input
    preprocess: Preprocess


def model_input_size(model: str) -> int:
    """The image size of an open_clip model from its config alone (no weights are built)."""
    register_tiny_configs()
    config = open_clip.get_model_config(model)
    if config is None:
        raise EncoderError(
            f"unknown model {model!r}: --model takes an open_clip model name (RN50, ViT-B-16, "
            "...) or fsar-tiny-vit / fsar-tiny-rn"
        )
    size = config["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def frame_indices(
    policy: FramePolicy, rule: str | None, source, rng: np.random.Generator
) -> list[int]:
    """Source frames of one draw: the release ``rule`` over the source video when the protocol
    names one (random rules use ``rng``), else the store's frame policy."""
    if rule is None:
        return select_frames(policy, source.num_frames)
    fps = float(getattr(source, "fps", 0.0)) or None
    return [int(i) for i in release_indices(rule, source.num_frames, rng, fps=fps)]


def dump_frames(
    config: Config,
    video_ids: Sequence[str],
    out: Path,
    *,
    sheet: Path | None = None,
    seed: int = 0,
    draws: int | None = None,
) -> FramesDump:
    """Write the encoder input of ``video_ids`` under ``config`` to ``out`` (.npz) and a sheet.

    draws: None for one draw (keys without a draw number); K for K seeded draws per video
    (``seed``, video id and draw number seed each one, so a draw does not depend on the others).
    """
    if not config.dataset.root:
        raise ConfigError("dataset.root is not set: pass --root DIR (the local copy of the videos)")
    if not video_ids:
        raise ConfigError("no videos given: pass --videos ID[,ID] (ids as `fsar cache info` shows)")
    if draws is not None and draws < 1:
        raise ConfigError(f"--draw must be >= 1, got {draws}")
    ex = config.extract
    dataset = dataset_from_config(config.dataset)
    items = {item.video_id: item for item in dataset.items}
    unknown = [v for v in video_ids if v not in items]
    if unknown:
        sample = ", ".join(list(items)[:5])
        raise ConfigError(
            f"video(s) {unknown[:5]} are not in {config.dataset.name} under "
            f"{config.dataset.root} (ids look like: {sample})"
        )
    missing = [v for v in video_ids if items[v].path is None]
    if missing:
        raise ConfigError(f"video(s) {missing[:5]} are listed but not found under --root")
    policy = parse_frame_policy(
        ex.frames, seq_len=ex.seq_len, t_cap=ex.t_cap, min_frames=ex.min_frames
    )
    views = parse_views(ex.views)
    rule = resolve_rule(config.protocol.test_frames, config.dataset.name)  # the test frames
    preprocess = preprocess_from_config(config, model_input_size(config.model.name))

    arrays: dict[str, np.ndarray] = {}
    rows: list[tuple[str, list[int]]] = []
    images: list[torch.Tensor] = []
    for video_id in video_ids:
        source = open_source(
            items[video_id].path, backend=ex.decode_backend, listing=ex.frame_listing
        )
        for draw in range(draws or 1):
            rng = np.random.default_rng(view_seed(seed, video_id, f"draw{draw}"))
            indices = frame_indices(policy, rule, source, rng)
            pixels = encoder_input(source, indices, views, preprocess, ex.seed, video_id)
            key = video_id if draws is None else f"{video_id}.draw{draw}"
            arrays[f"{key}.indices"] = np.asarray(indices, dtype=np.int64)
            for view, view_pixels in zip(views, pixels, strict=True):
                name = f"{key}.pixels" if view == "center" else f"{key}.{view}.pixels"
                arrays[name] = view_pixels.numpy().astype(np.float32, copy=False)
            rows.append((key, [int(i) for i in indices]))
            images.append(pixels[0])

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(out, buffer.getvalue())
    sheet = Path(sheet) if sheet is not None else out.with_suffix(".png")
    write_contact_sheet(sheet, rows, images, preprocess)
    return FramesDump(out, sheet, rows, preprocess.crop, preprocess)


def displayable(pixels: torch.Tensor, preprocess: Preprocess) -> np.ndarray:
    """Encoder input ``[T, 3, H, W]`` -> uint8 ``[T, H, W, 3]``: normalisation undone."""
    values = pixels.float()
    if preprocess.normalize:
        mean = torch.tensor(preprocess.mean).view(3, 1, 1)
        std = torch.tensor(preprocess.std).view(3, 1, 1)
        values = values * std + mean
    values = (values.clamp(0, 1) * 255).round().to(torch.uint8)
    return values.permute(0, 2, 3, 1).numpy()


def sheet_size(n_rows: int, n_columns: int, cell: int) -> tuple[int, int]:
    """(width, height) of a contact sheet of square cells with a label strip per row."""
    width = n_columns * cell + (n_columns + 1) * SHEET_GAP
    height = n_rows * (SHEET_LABEL + cell + SHEET_GAP) + SHEET_GAP
    return width, height


def write_contact_sheet(
    path: Path,
    rows: Sequence[tuple[str, Sequence[int]]],
    images: Sequence[torch.Tensor],
    preprocess: Preprocess,
) -> None:
    """A PNG: one row per (label, frames), the label and source indices above each row."""
    from PIL import Image, ImageDraw

    cell = preprocess.crop
    columns = max(len(frames) for _, frames in rows)
    canvas = Image.new("RGB", sheet_size(len(rows), columns, cell), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, ((label, frames), pixels) in enumerate(zip(rows, images, strict=True)):
        top = SHEET_GAP + r * (SHEET_LABEL + cell + SHEET_GAP)
        draw.text((SHEET_GAP, top + 1), f"{label}  frames {list(frames)}", fill=(0, 0, 0))
        for c, frame in enumerate(displayable(pixels, preprocess)):
            left = SHEET_GAP + c * (cell + SHEET_GAP)
            canvas.paste(Image.fromarray(frame), (left, top + SHEET_LABEL))
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
