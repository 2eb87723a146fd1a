"""Release frame rules on a dense store: draw *source* frames, gather the cached rows.

``protocol.test_frames`` / ``protocol.train_frames`` name how episodes pick a video's 8 frames:

- ``cached`` (and ``segment_random`` at test): fsar's rules over the store's cached frames
  (SPEC 3), for any store;
- a release rule (``fsar.data.release_frames``): the frames the release itself would decode,
  drawn over the *source* video (its decoded length and fps are in the store) and mapped to
  cached rows through ``videos/frame_index``. These need a ``dense`` store, except
  ``clipspm_test`` on a ``reference_test`` store of T = 8 (the same frames).
  ``clipfsar_test`` / ``clipfsar_train`` resolve per dataset: Kinetics-100's clip rules there,
  the segment rule elsewhere.

Random test rules are redrawn for every occurrence of a video in an episode, seeded by
(eval seed, episode index): every head sees identical frames, and any slice of the episode
list draws the same frames as the whole list.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fsar.data.release_frames import (
    RANDOM_RULES,
    ReleaseFrameError,
    cached_positions,
    release_indices,
    resolve_rule,
)
from fsar.errors import FsarError


class FramePolicyError(FsarError, ValueError):
    """A frame rule needs source frames the store did not cache; names the policy to use."""


def store_frames(recipe: dict) -> str:
    """A store's frame policy as 'kind:T_cap' (e.g. 'reference_test:8', 'dense:512')."""
    kind = recipe.get("frame_policy") or str(recipe.get("frames", "")).split(":")[0]
    return f"{kind}:{recipe.get('t_cap')}"


def needs_dense(rule: str | None, frames: str) -> bool:
    """Whether ``rule`` needs a dense store, given the store's frame policy ('kind:T_cap')."""
    if rule is None:
        return False
    if rule == "clipspm_test":  # reference_test:8 caches exactly CLIP-SPM's test frames
        return frames.split(":")[0] != "dense" and frames != "reference_test:8"
    return frames.split(":")[0] != "dense"


def check_store_frames(key: str, value: str, store_frames: str, dataset: str | None, path) -> None:
    """Refuse, before any work, a release rule on a store that lacks its source frames."""
    rule = resolve_rule(value, dataset)
    if needs_dense(rule, store_frames):
        raise FramePolicyError(
            f"{key}={value} draws source frames with the release rule {rule}, but {path} caches "
            f"only '{store_frames}' frames: extract it with --frames dense (extract.frames="
            "dense:CAP, every source frame) or set it to cached"
        )


def occurrence_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of evaluation episode ``index`` (or training draw ``index``)."""
    return np.random.default_rng([int(seed), int(index)])


@dataclass
class FrameTable:
    """What rules read from a bank: per video its cached source frames, length and fps."""

    frame_index: np.ndarray  # int32 [V, T_cap], -1 padding
    n_frames: np.ndarray  # int64 [V] cached frames
    source_length: np.ndarray  # int64 [V] decoded source frames
    fps: np.ndarray  # float64 [V]

    @classmethod
    def of(cls, bank) -> FrameTable:
        if bank.frame_index is None:
            raise ValueError("this bank records no frame_index (not loaded from a store)")
        n = bank.n_frames.cpu().numpy().astype(np.int64)
        length = np.asarray(bank.source_length, dtype=np.int64)
        # stores written before videos/source_length existed: the last cached frame + 1
        last = np.take_along_axis(bank.frame_index, np.maximum(n - 1, 0)[:, None], 1)[:, 0]
        length = np.where(length > 0, length, last.astype(np.int64) + 1)
        capped = int((n < length).sum())
        if capped:  # said once per bank and call site (Python's warning registry)
            warnings.warn(
                f"{capped} of {len(n)} {bank.split!r} videos are longer than the store's dense "
                f"cap ({bank.frame_policy}): release rules drawing one of their uncached frames "
                "take the nearest cached one; extract with a larger dense:CAP for exact frames",
                stacklevel=2,
            )
        return cls(bank.frame_index, n, length, np.asarray(bank.fps, dtype=np.float64))

    def positions(
        self, rule: str, rows: np.ndarray, rng: np.random.Generator | None, video_ids=None
    ) -> tuple[np.ndarray, int]:
        """Draw ``rule`` for each bank row in order: (cached positions int64 [R, T], number of
        draws that were not cached exactly and took the nearest cached frame)."""
        out = np.empty((len(rows), 8), dtype=np.int64)
        inexact = 0
        for i, row in enumerate(np.asarray(rows, dtype=np.int64)):
            try:
                source = release_indices(
                    rule, int(self.source_length[row]), rng, fps=float(self.fps[row])
                )
            except ReleaseFrameError as err:
                name = video_ids[row] if video_ids is not None else f"bank row {row}"
                raise ReleaseFrameError(f"video {name}: {err}") from err
            cached = self.frame_index[row, : self.n_frames[row]]
            out[i], exact = cached_positions(cached, source)
            inexact += not exact
        return out, inexact


def deterministic_table(bank, rule: str) -> torch.Tensor:
    """long [V, T] positions of a deterministic rule for every bank video."""
    table = FrameTable.of(bank)
    positions, _ = table.positions(rule, np.arange(len(bank)), None, bank.video_ids)
    return torch.from_numpy(positions).to(bank.device)


def episode_positions(
    bank, episodes, first_index: int, rule: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-occurrence frames of B evaluation episodes numbered first_index, first_index + 1, ...

    Episode e draws from ``occurrence_rng(seed, e)``: its supports in order, then its queries.
    Returns cached positions (support long [B, S, T], query long [B, Q, T]) on the bank's device.
    """
    table = FrameTable.of(bank)
    support = episodes.support.cpu().numpy()
    query = episodes.query.cpu().numpy()
    s_out = np.empty((*support.shape, 8), dtype=np.int64)
    q_out = np.empty((*query.shape, 8), dtype=np.int64)
    for b in range(len(support)):
        rng = occurrence_rng(seed, first_index + b)
        rows = np.concatenate([support[b], query[b]])
        drawn, _ = table.positions(rule, rows, rng, bank.video_ids)
        s_out[b], q_out[b] = drawn[: support.shape[1]], drawn[support.shape[1] :]
    device = bank.device
    return torch.from_numpy(s_out).to(device), torch.from_numpy(q_out).to(device)


def training_positions(
    bank, episodes, rule: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Release training frames of B episodes, drawn per occurrence as the release redraws a
    video every time it loads it: (support long [B, S, T], query long [B, Q, T]) cached
    positions on the bank's device.

    The numpy generator is seeded by one draw of the torch ``generator``, whose state the
    training checkpoints hold, so a resumed run draws the same frames.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed) if rule in RANDOM_RULES else None
    table = FrameTable.of(bank)
    support, query = episodes.support.cpu().numpy(), episodes.query.cpu().numpy()
    rows = np.concatenate([support, query], axis=1)  # per episode: supports, then queries
    drawn, _ = table.positions(rule, rows.reshape(-1), rng, bank.video_ids)
    drawn = torch.from_numpy(drawn.reshape(*rows.shape, -1)).to(bank.device)
    return drawn[:, : support.shape[1]], drawn[:, support.shape[1] :]
