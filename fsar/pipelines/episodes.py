"""N-way K-shot episodes drawn from a FeatureBank, B at a time, as index tensors (SPEC 6).

Classes and videos are drawn without replacement, supports and queries are shuffled, and all
randomness comes from one CPU ``torch.Generator``: the same seed gives the same episodes on any
device. There is no per-episode Python on the hot path: a batch of B episodes is a few
``argsort`` calls over a padded [classes, videos] table and one gather.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fsar.cache.bank import FeatureBank
from fsar.data.frames import linspace_trunc, train_frame_positions
from fsar.errors import FsarError


class EpisodeSpecError(FsarError, ValueError):
    """The requested episodes cannot be drawn from this split; the message says what to change."""


@dataclass(frozen=True)
class EpisodeShape:
    way: int
    shot: int
    query: int

    def __str__(self) -> str:
        return f"{self.way}-way {self.shot}-shot {self.query}-query"


@dataclass
class EpisodeIndex:
    """B episodes as bank rows; label n of episode b is dataset class ``classes[b, n]``.

    support, support_labels: long [B, N*K]; query, query_labels: long [B, N*Q]; classes [B, N].
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor

    def __len__(self) -> int:
        return int(self.support.shape[0])

    def slice(self, start: int, stop: int) -> EpisodeIndex:
        return EpisodeIndex(*(t[start:stop] for t in self._tensors()))

    def to(self, device: torch.device | str) -> EpisodeIndex:
        return EpisodeIndex(*(t.to(device) for t in self._tensors()))

    def digest(self) -> str:
        """sha256 of the episode list: equal digests mean identical episodes."""
        h = hashlib.sha256()
        for tensor in self._tensors():
            h.update(tensor.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.support, self.support_labels, self.query, self.query_labels, self.classes)


class EpisodeSampler:
    """Draws episodes of one shape from one bank (checked once, when built)."""

    def __init__(
        self,
        bank: FeatureBank,
        shape: EpisodeShape,
        keys: tuple[str, str, str] = ("episodes.way", "episodes.shot", "episodes.query"),
        classes: Sequence[int] | None = None,
    ):
        """``bank``: a FeatureBank, or any table of videos with ``class_ids``, ``split`` and
        ``class_names`` (fine-tuning draws from a ``VideoSplit`` of decodable videos).
        ``keys`` names the config keys that set way, shot and query, for error messages;
        ``classes`` restricts the episodes to these dataset class ids."""
        self.shape = shape
        class_ids = bank.class_ids.cpu()
        rows = torch.arange(len(class_ids))
        if classes is not None:
            keep = torch.isin(class_ids, torch.as_tensor(list(classes), dtype=torch.long))
            class_ids, rows = class_ids[keep], rows[keep]
        classes, counts = torch.unique(class_ids, return_counts=True)
        if shape.way > len(classes):
            raise EpisodeSpecError(
                f"{shape.way}-way episodes need {shape.way} classes but the {bank.split!r} split "
                f"has {len(classes)} with extracted videos: lower {keys[0]} to at most "
                f"{len(classes)}"
            )
        need = shape.shot + shape.query
        smallest = int(counts.argmin())
        if int(counts[smallest]) < need:
            name = bank.class_names[int(classes[smallest])]
            raise EpisodeSpecError(
                f"shot + query = {shape.shot} + {shape.query} = {need} videos per class, but "
                f"class {name!r} of the {bank.split!r} split has only {int(counts[smallest])} "
                f"extracted videos: lower {keys[1]} or {keys[2]} so that shot + query <= "
                f"{int(counts.min())}"
            )
        # table[c, m] = bank row of the m-th video of class c; padded with -1
        self.classes = classes  # [C] dataset class ids
        self.counts = counts  # [C]
        order = rows[torch.argsort(class_ids, stable=True)]
        width = int(counts.max())
        offsets = torch.cumsum(counts, 0) - counts
        self.table = torch.full((len(classes), width), -1, dtype=torch.long)
        position = torch.arange(len(class_ids)) - torch.repeat_interleave(offsets, counts)
        # position indexes the class-sorted order, so fill the table in that order
        self.table[torch.repeat_interleave(torch.arange(len(classes)), counts), position] = order

    def sample(self, count: int, generator: torch.Generator) -> EpisodeIndex:
        """``count`` episodes (CPU tensors)."""
        way, shot, query = self.shape.way, self.shape.shot, self.shape.query
        n_classes, width = self.table.shape
        chosen = torch.rand(count, n_classes, generator=generator).argsort(1)[:, :way]  # [B, N]
        keys = torch.rand(count, way, width, generator=generator)
        keys = keys.masked_fill(self.table[chosen] < 0, 2.0)  # padding sorts last
        picks = keys.argsort(-1)[..., : shot + query]  # [B, N, K+Q] distinct videos per class
        rows = torch.gather(self.table[chosen], 2, picks)
        labels = torch.arange(way).view(1, way, 1)
        support, query_rows = rows[..., :shot].flatten(1), rows[..., shot:].flatten(1)
        support_labels = labels.expand(count, way, shot).flatten(1)
        query_labels = labels.expand(count, way, query).flatten(1)
        support, support_labels = _shuffle(support, support_labels, generator)
        query_rows, query_labels = _shuffle(query_rows, query_labels, generator)
        return EpisodeIndex(
            support, support_labels, query_rows, query_labels, self.classes[chosen].clone()
        )


def _shuffle(
    rows: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.rand(rows.shape, generator=generator).argsort(1)
    return rows.gather(1, order), labels.gather(1, order)


def fixed_episodes(bank: FeatureBank, shape: EpisodeShape, count: int, seed: int) -> EpisodeIndex:
    """The evaluation list of (split, shape, seed): identical for every head and ablation."""
    generator = torch.Generator().manual_seed(seed)
    return EpisodeSampler(bank, shape).sample(count, generator)


def cached_test_positions(n_frames: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The deterministic test frames over cached frames: ``reference_test`` applied to n.

    For a store built with ``reference_test`` (n = seq_len) this is every cached frame in
    order. n_frames long [V] -> positions long [V, T].
    """
    n = n_frames.long()
    short = n - 3 < seq_len
    start = torch.where(short, torch.zeros_like(n), torch.ones_like(n))
    end = torch.where(short, n - 1, n - 2)
    return linspace_trunc(start, end, seq_len)


def segment_random_positions(
    n_frames: torch.Tensor, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """One uniformly drawn cached frame in each of ``seq_len`` equal segments (CLIP-FSAR test).

    Videos with fewer cached frames than segments repeat frames. Draws V * T uniforms.
    """
    n = n_frames.long().cpu()
    draws = torch.rand(len(n), seq_len, generator=generator, dtype=torch.float64)
    edges = torch.arange(seq_len + 1, dtype=torch.float64) / seq_len  # [T+1]
    low = edges[:-1] * n[:, None]
    high = edges[1:] * n[:, None]
    positions = (low + draws * (high - low)).floor().long()
    return torch.minimum(positions, (n - 1)[:, None]).clamp(min=0).to(n_frames.device)


def train_positions(
    n_frames: torch.Tensor, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """The releases' training jitter over cached frames (SPEC 3): [V] -> long [V, T]."""
    return train_frame_positions(n_frames.cpu(), seq_len, generator).to(n_frames.device)


__all__ = [
    "EpisodeIndex",
    "EpisodeSampler",
    "EpisodeShape",
    "EpisodeSpecError",
    "cached_test_positions",
    "fixed_episodes",
    "segment_random_positions",
    "train_positions",
]
