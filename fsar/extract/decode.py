"""Decode-and-transform work done in DataLoader workers: one item = one video, all its views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fsar.data.frames import FramePolicy, select_frames
from fsar.data.transforms import Preprocess, apply_view, view_seed
from fsar.data.video import DecodeError, open_source


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
    ):
        self.jobs = list(jobs)
        self.policy = policy
        self.views = tuple(views)
        self.preprocess = preprocess
        self.seed = seed
        self.decode_backend = decode_backend

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, position: int) -> DecodedVideo:
        job = self.jobs[position]
        empty = np.zeros(0, dtype=np.int32)
        if job.path is None:
            return DecodedVideo(job.store_index, None, empty, "missing: not found under --root")
        try:
            source = open_source(Path(job.path), backend=self.decode_backend)
            indices = select_frames(self.policy, source.num_frames)
            frames = source.read(indices)  # uint8 [n, H, W, 3]
            views = [
                apply_view(frames, view, self.preprocess, view_seed(self.seed, job.video_id, view))
                for view in self.views
            ]
        except DecodeError as err:
            return DecodedVideo(job.store_index, None, empty, str(err))
        except Exception as err:  # a decoder crash on one file must not stop the run
            return DecodedVideo(job.store_index, None, empty, f"{type(err).__name__}: {err}")
        return DecodedVideo(
            job.store_index, torch.stack(views), np.asarray(indices, dtype=np.int32), ""
        )


def collate_single(batch: list[DecodedVideo]) -> DecodedVideo:
    return batch[0]
