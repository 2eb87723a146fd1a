"""Episodes of decoded video clips for end-to-end fine-tuning (SPEC 6, finetune-e2e).

Each DataLoader item is one whole episode, decoded and cropped in a worker and handed over as
uint8 pixels (the device scales them), so workers prefetch whole episodes:

- ``TrainEpisodes``: item t = global training task t. Its episode, frame jitter, crop and flip
  are drawn from a generator seeded by (seed, t) alone, so the stream does not depend on the
  worker, the rank or where a resumed run starts: a rank takes its tasks of each global batch,
  and a resumed run starts at the first task of its next step. With a release training rule
  (``protocol.train_frames``) the frames follow the release's index rule and the pixels its
  augmentation (``fsar.data.release_augment``).
- ``EvalEpisodes``: item e = fixed evaluation episode e, with the test policy (``reference_test``
  frames over the source video, or a release test rule, redrawn per occurrence and seeded by
  (eval seed, e) as on a dense store; center crop): the pixels ``fsar extract`` caches.
- ``EvalVideos``: item v = one video with the test policy, for encoding a split once.

``VideoSplit`` is the videos of one split that have a local file; it offers the fields an
``EpisodeSampler`` reads from a feature bank, so episodes are drawn by the same code. Its rows
are the dataset's order, which is a store's order: when every video decodes, episode lists over
a ``VideoSplit`` and over that split of a store are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fsar.data.datasets import DatasetIndex
from fsar.data.frames import FramePolicy, select_frames, train_frame_positions
from fsar.data.release_augment import clipfsar_train_clip, clipspm_train_clip
from fsar.data.release_frames import RANDOM_RULES, release_indices
from fsar.data.transforms import Preprocess, crop_view, train_augment
from fsar.data.video import open_source
from fsar.errors import FsarError
from fsar.pipelines.episodes import EpisodeIndex, EpisodeSampler
from fsar.pipelines.frame_plan import occurrence_rng


@dataclass
class VideoSplit:
    """Videos of one split with a local file; class_ids long [V]."""

    split: str
    video_ids: tuple[str, ...]
    paths: tuple[str, ...]
    class_ids: torch.Tensor
    class_names: tuple[str, ...]
    skipped: int  # listed videos of the split without a local file
    listing: str = "natural_images"  # frame-folder listing rule (extract.frame_listing)

    def __len__(self) -> int:
        return len(self.video_ids)


def video_split(dataset: DatasetIndex, split: str, listing: str = "natural_images") -> VideoSplit:
    items = [item for item in dataset.items if item.split == split]
    present = [item for item in items if item.path is not None]
    if not present:
        raise ClipError(
            f"the {split!r} split of {dataset.name} has no local videos ({len(items)} listed): "
            "check --root (or dataset.root)"
        )
    return VideoSplit(
        split=split,
        video_ids=tuple(item.video_id for item in present),
        paths=tuple(str(item.path) for item in present),
        class_ids=torch.tensor([item.class_id for item in present], dtype=torch.long),
        class_names=tuple(dataset.class_names),
        skipped=len(items) - len(present),
        listing=listing,
    )


class ClipError(FsarError, RuntimeError):
    """A video of an episode could not be read; names the video and the fix."""


def task_seed(seed: int, task: int, stream: int = 0) -> int:
    """A 63-bit seed mixed from (seed, global task index, stream): stream 0 draws the episode and
    its augmentation, stream 1 the dropout masks of its forward pass."""
    state = np.random.SeedSequence([int(seed), int(task), int(stream)]).generate_state(2)
    return ((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def task_generator(seed: int, task: int) -> torch.Generator:
    return torch.Generator().manual_seed(task_seed(seed, task))


def _read(videos: VideoSplit, row: int, pick, backend: str) -> np.ndarray:
    """uint8 [T, H, W, 3] frames ``pick(n_source_frames, fps)`` of video ``row``."""
    try:
        source = open_source(
            Path(videos.paths[row]), backend=backend, threads=1, listing=videos.listing
        )
        fps = float(getattr(source, "fps", 0.0))  # frame folders have none (0)
        return source.read(pick(source.num_frames, fps))
    except Exception as err:
        raise ClipError(
            f"video {videos.video_ids[row]} ({videos.paths[row]}) of the {videos.split!r} split "
            f"could not be read: {err}. Fix or remove the file (fsar splits verify --root lists "
            "missing videos)"
        ) from err


@dataclass
class EpisodeClips:
    """One episode's pixels: support uint8 [S, T, 3, H, W], query uint8 [Q, T, 3, H, W]."""

    task: int
    episode: EpisodeIndex  # one episode: tensors [1, ...] of VideoSplit rows
    support: torch.Tensor
    query: torch.Tensor


class TrainEpisodes(Dataset):
    """Global task t -> its episode, decoded with the releases' training frames and augmentation.

    rule: a release training rule (``clipspm_train``, ``clipfsar_segment``,
    ``clipfsar_k100_train``) over the source frames, with that release's augmentation; None:
    the jitter of SPEC 3 over the source frames with crop-then-flip (``train_augment``).
    k100_queries: CLIP-FSAR on Kinetics-100, whose queries alone are flipped and colour-jittered.
    """

    def __init__(
        self,
        videos: VideoSplit,
        sampler: EpisodeSampler,
        seed: int,
        seq_len: int,
        prep: Preprocess,
        flip: bool,
        backend: str = "auto",
        rule: str | None = None,
        k100_queries: bool = False,
    ):
        self.videos, self.sampler, self.seed, self.seq_len = videos, sampler, seed, seq_len
        self.prep, self.flip, self.backend = prep, flip, backend
        self.rule, self.k100_queries = rule, k100_queries

    def __len__(self) -> int:  # tasks are drawn by index; the loop bounds them
        return 2**62

    def __getitem__(self, task: int) -> EpisodeClips:
        generator = task_generator(self.seed, task)
        episode = self.sampler.sample(1, generator)
        if self.rule is not None:
            rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
            support = [self.release_clip(int(row), rng, False) for row in episode.support[0]]
            query = [self.release_clip(int(row), rng, True) for row in episode.query[0]]
            return EpisodeClips(task, episode, torch.stack(support), torch.stack(query))

        def clip(row: int) -> torch.Tensor:
            def pick(n: int, fps: float) -> list[int]:
                n_frames = torch.tensor([n])
                return train_frame_positions(n_frames, self.seq_len, generator)[0].tolist()

            frames = _read(self.videos, row, pick, self.backend)
            return train_augment(frames, self.prep, generator, self.flip)

        support = torch.stack([clip(int(row)) for row in episode.support[0]])
        query = torch.stack([clip(int(row)) for row in episode.query[0]])
        return EpisodeClips(task, episode, support, query)

    def release_clip(self, row: int, rng: np.random.Generator, is_query: bool) -> torch.Tensor:
        """One video as the release trains on it: its frame rule, then its augmentation."""
        frames = _read(
            self.videos, row, lambda n, fps: release_indices(self.rule, n, rng, fps), self.backend
        )
        if self.rule == "clipspm_train":
            return clipspm_train_clip(frames, self.prep, rng, self.flip)
        return clipfsar_train_clip(frames, self.prep, rng, self.k100_queries and is_query)


class EvalEpisodes(Dataset):
    """Fixed episode e -> its videos with the test policy (what a store caches)."""

    def __init__(
        self,
        videos: VideoSplit,
        episodes: EpisodeIndex,
        policy: FramePolicy,
        prep: Preprocess,
        backend: str = "auto",
        rule: str | None = None,
        seed: int = 0,
    ):
        self.clips = EvalVideos(videos, policy, prep, backend, rule)
        self.episodes, self.rule, self.seed = episodes, rule, seed

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> EpisodeClips:
        episode = self.episodes.slice(index, index + 1)
        # the draws of episode `index` on a dense store: supports in order, then queries
        rng = occurrence_rng(self.seed, index) if self.rule in RANDOM_RULES else None
        support = torch.stack([self.clips.clip(int(row), rng) for row in episode.support[0]])
        query = torch.stack([self.clips.clip(int(row), rng) for row in episode.query[0]])
        return EpisodeClips(index, episode, support, query)


class EvalVideos(Dataset):
    """Video row -> uint8 [T, 3, crop, crop]: ``policy`` frames (or the release test ``rule``'s
    deterministic frames), center crop."""

    def __init__(
        self,
        videos: VideoSplit,
        policy: FramePolicy,
        prep: Preprocess,
        backend: str = "auto",
        rule: str | None = None,
    ):
        self.videos, self.policy, self.prep, self.backend = videos, policy, prep, backend
        self.rule = rule

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, row: int) -> torch.Tensor:
        return self.clip(row, None)

    def clip(self, row: int, rng: np.random.Generator | None) -> torch.Tensor:
        """The clip of ``row``; a random rule draws from ``rng``."""
        if self.rule is None:

            def pick(n: int, fps: float) -> list[int]:
                return select_frames(self.policy, n)
        else:

            def pick(n: int, fps: float) -> list[int]:
                return release_indices(self.rule, n, rng, fps).tolist()

        frames = _read(self.videos, row, pick, self.backend)
        return crop_view(frames, "center", self.prep)


class DenseVideos(EvalVideos):
    """Video row -> every source frame (``policy`` is a dense policy), center crop, with what a
    dense store records: (uint8 [n, 3, crop, crop], frame_index int [n], source length, fps)."""

    def __getitem__(self, row: int):
        seen = {}

        def pick(n: int, fps: float) -> list[int]:
            seen.update(length=n, fps=fps, index=select_frames(self.policy, n))
            return seen["index"]

        frames = _read(self.videos, row, pick, self.backend)
        pixels = crop_view(frames, "center", self.prep)
        return pixels, np.asarray(seen["index"]), seen["length"], seen["fps"]


@dataclass
class ClipBatch:
    """B episodes of one shape, stacked: pixels uint8 [B, S|Q, T, 3, H, W]."""

    tasks: list[int]
    episodes: EpisodeIndex
    support: torch.Tensor
    query: torch.Tensor


def collate_episodes(items: list[EpisodeClips]) -> ClipBatch:
    fields = ("support", "support_labels", "query", "query_labels", "classes")
    joined = [torch.cat([getattr(item.episode, name) for item in items]) for name in fields]
    return ClipBatch(
        tasks=[item.task for item in items],
        episodes=EpisodeIndex(*joined),
        support=torch.stack([item.support for item in items]),
        query=torch.stack([item.query for item in items]),
    )
