"""Scoring heads on fixed episode lists: accuracy, 95% interval, confusion, paired comparison.

The interval is the papers' ``1.96 * std / sqrt(episodes)`` over per-episode accuracies (std
with ddof=0, as numpy's default in the releases).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from fsar.cache.bank import FeatureBank
from fsar.config import HeadConfig
from fsar.data.release_frames import RANDOM_RULES
from fsar.errors import FsarError
from fsar.heads import FewShotHead
from fsar.pipelines.build import episode_tensors
from fsar.pipelines.episodes import (
    EpisodeIndex,
    cached_test_positions,
    segment_random_positions,
)
from fsar.pipelines.frame_plan import deterministic_table, episode_positions, resolve_rule


class NonFiniteScores(FsarError, ValueError):
    """A head gave NaN or infinite logits: its accuracy would be a number made of nothing."""


@dataclass
class EvalSetup:
    """A bank, its fixed episodes and the evaluation frame policy."""

    bank: FeatureBank
    episodes: EpisodeIndex
    seq_len: int
    test_frames: str  # protocol.test_frames: "cached" | "segment_random" | a release rule
    seed: int
    dataset: str | None = None  # resolves clipfsar_test (Kinetics-100 rules on kinetics)

    @property
    def rule(self) -> str | None:
        """The release rule drawn over source frames (None: fsar's cached rules)."""
        rule = resolve_rule(self.test_frames, self.dataset)
        if rule == "clipspm_test" and not self.bank.frame_policy.startswith("dense"):
            return None  # a reference_test:8 store caches exactly these frames
        return rule

    def positions(self) -> torch.Tensor | None:
        """long [V_bank, T]; seeded, so every head sees the same frames. None when the frames
        are redrawn per episode occurrence (``episode_positions``)."""
        rule = self.rule
        if rule in RANDOM_RULES:
            return None
        if rule is not None:
            return deterministic_table(self.bank, rule)
        if self.test_frames == "segment_random":
            generator = torch.Generator().manual_seed(self.seed + 1)
            return segment_random_positions(self.bank.n_frames, self.seq_len, generator)
        return cached_test_positions(self.bank.n_frames, self.seq_len)

    def episode_positions(self, start: int, episodes: EpisodeIndex):
        """(support [B, S, T], query [B, Q, T]) cached positions of episodes start, start+1..."""
        return episode_positions(self.bank, episodes, start, self.rule, self.seed)


@dataclass
class EvalOutcome:
    per_episode: np.ndarray  # float64 [E] accuracy of each episode in [0, 1]
    confusion: np.ndarray  # int64 [C, C] true dataset class x predicted dataset class

    @property
    def accuracy(self) -> float:
        """Mean accuracy in percent."""
        return float(100.0 * self.per_episode.mean())

    @property
    def std(self) -> float:
        return float(100.0 * self.per_episode.std())

    @property
    def ci95(self) -> float:
        """Half-width of the 95% interval, in percent points."""
        return interval(self.per_episode)


def interval(values: np.ndarray) -> float:
    """``1.96 * std / sqrt(n)`` in percent points for values in [0, 1]."""
    return float(100.0 * 1.96 * values.std() / np.sqrt(len(values)))


@torch.no_grad()
def evaluate_episodes(
    head: FewShotHead,
    setup: EvalSetup,
    head_config: HeadConfig,
    episode_batch: int,
    progress: bool = False,
) -> EvalOutcome:
    """Run ``head`` (in eval mode) on every episode of ``setup``; a tqdm bar on stderr when
    ``progress``. Non-finite logits raise ``NonFiniteScores``."""
    was_training = head.training
    head.eval()
    bank = setup.bank
    table = setup.positions()
    n_classes = len(bank.class_text)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    accuracies = []
    total = len(setup.episodes)
    bar = tqdm(total=total, unit="episode", desc="eval", disable=not progress)
    try:
        for start in range(0, total, episode_batch):
            episodes = setup.episodes.slice(start, start + episode_batch)
            positions = table if table is not None else setup.episode_positions(start, episodes)
            batch = episode_tensors(bank, episodes, positions, None, head_config, training=False)
            logits = head(batch.support, batch.support_labels, batch.query, batch.class_text)
            accuracies.append(tally(logits.logits, episodes, confusion))
            bar.update(len(episodes))
    finally:
        bar.close()
        head.train(was_training)
    return EvalOutcome(torch.cat(accuracies).numpy(), confusion.numpy())


def tally(logits: torch.Tensor, episodes: EpisodeIndex, confusion: torch.Tensor) -> torch.Tensor:
    """Per-episode accuracy (float64 [B], CPU) of logits [B, Q, N]; adds each query's
    (true, predicted) dataset-class pair to ``confusion`` (long [C, C]).

    Non-finite logits raise ``NonFiniteScores``: argmax would still pick a class."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteScores(
            "the head gave NaN or infinite scores: no accuracy can be computed (a diverged "
            "head, or NaN features: check the store with fsar cache verify)"
        )
    predicted = logits.argmax(-1).cpu()  # [B, Q]
    query_labels = episodes.query_labels.cpu()
    classes = episodes.classes.cpu()  # [B, N] dataset ids
    n_classes = confusion.shape[0]
    true_ids = torch.gather(classes, 1, query_labels)
    predicted_ids = torch.gather(classes, 1, predicted)
    counts = torch.bincount(
        (true_ids * n_classes + predicted_ids).flatten(), minlength=n_classes * n_classes
    )
    confusion += counts.view(n_classes, n_classes)
    return (predicted == query_labels).double().mean(1)


@dataclass
class Comparison:
    """Paired difference A - B on identical episodes, in percent points."""

    difference: float
    ci95: float
    a: float
    b: float
    episodes: int


def compare(a: EvalOutcome, b: EvalOutcome) -> Comparison:
    if len(a.per_episode) != len(b.per_episode):
        raise ValueError("a paired comparison needs both heads scored on the same episodes")
    delta = a.per_episode - b.per_episode
    return Comparison(
        difference=float(100.0 * delta.mean()),
        ci95=interval(delta),
        a=a.accuracy,
        b=b.accuracy,
        episodes=len(delta),
    )
