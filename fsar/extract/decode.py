"""Decode-and-transform work done in DataLoader workers: one item = one store block of videos.

A block travels from a worker to the main process as one tensor, so the per-item cost of
inter-process transfer is paid once per block rather than once per video.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fsar.data.frames import FramePolicy, select_frames
from fsar.data.transforms import Preprocess, apply_view, view_seed
from fsar.data.video import DecodeError, FrameSource, open_source


@dataclass(frozen=True)
class VideoJob:
    store_index: int  # row of the video in the store
    video_id: str
    path: str | None  # None: the file is missing from the local copy


@dataclass
class DecodedVideo:
    store_index: int
    frames: torch.Tensor | None  # [V, n, 3, crop, crop] float32, None on failure
    frame_index: np.ndarray  # int32 [n] source frame numbers
    error: str  # "" when decoded
    source_length: int = 0  # decoded frames of the source (0 = unknown)
    fps: float = 0.0  # average fps of the source (0: unknown, e.g. a frame folder)


@dataclass
class DecodedBlock:
    """The decoded videos of one store block.

    ``pixels`` holds the frames of every decoded video, video-major then view then frame:
    ``[sum over decoded videos of V * n, 3, crop, crop]`` float32. Failed videos have no frames.
    """

    videos: list[DecodedVideo]  # frames left None; ``frame_index`` gives each video's n
    pixels: torch.Tensor


class DecodeDataset(Dataset):
    """Reads the policy's frames of each job and applies every view."""

    def __init__(
        self,
        jobs: Sequence[VideoJob],
        policy: FramePolicy,
        views: Sequence[str],
        preprocess: Preprocess,
        seed: int,
        decode_backend: str = "auto",
        frame_listing: str = "natural_images",
    ):
        self.jobs = list(jobs)
        self.policy = policy
        self.views = tuple(views)
        self.preprocess = preprocess
        self.seed = seed
        self.decode_backend = decode_backend
        self.frame_listing = frame_listing

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, position: int) -> DecodedVideo:
        job = self.jobs[position]
        empty = np.zeros(0, dtype=np.int32)
        if job.path is None:
            return DecodedVideo(job.store_index, None, empty, "missing: not found under --root")
        length, fps = 0, 0.0
        try:
            source = open_source(
                Path(job.path), backend=self.decode_backend, listing=self.frame_listing
            )
            length, fps = source.num_frames, float(getattr(source, "fps", 0.0))
            indices = select_frames(self.policy, source.num_frames)
            pixels = encoder_input(
                source, indices, self.views, self.preprocess, self.seed, job.video_id
            )
        except DecodeError as err:
            return DecodedVideo(job.store_index, None, empty, str(err), length, fps)
        except Exception as err:  # a decoder crash on one file must not stop the run
            error = f"{type(err).__name__}: {err}"
            return DecodedVideo(job.store_index, None, empty, error, length, fps)
        return DecodedVideo(
            job.store_index, pixels, np.asarray(indices, dtype=np.int32), "", length, fps
        )


def encoder_input(
    source: FrameSource,
    indices: Sequence[int],
    views: Sequence[str],
    preprocess: Preprocess,
    seed: int,
    video_id: str,
) -> torch.Tensor:
    """What the encoder sees for one video: float32 ``[V, T, 3, crop, crop]``, the frames at
    ``indices`` through every view. The extraction runner and ``fsar frames`` both call this, so
    the frames a person looks at are the frames that were encoded."""
    frames = source.read(indices)  # uint8 [T, H, W, 3]
    return torch.stack(
        [apply_view(frames, view, preprocess, view_seed(seed, video_id, view)) for view in views]
    )


class BlockDataset(Dataset):
    """One item per store block: decodes the block's jobs and packs their frames."""

    def __init__(self, videos: DecodeDataset, block_sizes: Sequence[int]):
        self.videos = videos
        self.starts = np.concatenate([[0], np.cumsum(block_sizes)]).astype(int)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, position: int) -> DecodedBlock:
        decoded = [self.videos[i] for i in range(self.starts[position], self.starts[position + 1])]
        frames = [video.frames.flatten(0, 1) for video in decoded if video.frames is not None]
        pixels = torch.cat(frames) if frames else torch.zeros(0)
        for video in decoded:
            video.frames = None
        return DecodedBlock(decoded, pixels)


def collate_single(batch: list[DecodedBlock]) -> DecodedBlock:
    return batch[0]
