"""Runs of one table row or report cell, one per training seed: mean, spreads, pairings.

A group's accuracy is the mean of its seeds' accuracies; its interval is the papers' 95% episode
interval of the seed-averaged per-episode accuracies; two groups are compared on (seed index,
episode) pairs, seed k of one against seed k of the other (each pair trained from the same seed
on the same episode stream and scored on the same episode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsar.pipelines.evaluate import Comparison, EvalOutcome, compare, interval
from fsar.pipelines.jobs import JobsError


@dataclass
class GroupSummary:
    """The runs of one group (a table row, a report cell): one per training seed."""

    records: list[dict[str, Any]]
    per_episode: np.ndarray  # float64 [S, E]: accuracy of seed s on episode e, in [0, 1]

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.records]

    @property
    def seed_accuracies(self) -> list[float]:
        return [r["result"]["accuracy"] for r in self.records]

    @property
    def accuracy(self) -> float:
        """Mean over seeds of each seed's accuracy (%); one seed: its accuracy."""
        return float(np.mean(self.seed_accuracies))

    @property
    def ci95(self) -> float:
        """95% episode interval of the seed-averaged per-episode accuracies."""
        return interval(self.per_episode.mean(0))

    @property
    def seed_std(self) -> float | None:
        """Sample std over seeds (ddof 1) of the accuracy; None with one seed."""
        return float(np.std(self.seed_accuracies, ddof=1)) if len(self.records) > 1 else None

    @property
    def selection_accuracy(self) -> float | None:
        found = [r["result"]["selection"] for r in self.records]
        if any(s is None for s in found):
            return None
        return float(np.mean([s["accuracy"] for s in found]))

    def outcome(self) -> EvalOutcome:
        """Seed x episode pairs as one outcome (seed-major), for paired differences."""
        return EvalOutcome(self.per_episode.reshape(-1), np.zeros((0, 0), np.int64))


def summarize(records: list[dict[str, Any]]) -> dict[str, GroupSummary]:
    """group -> its runs, in plan order; every run of a group scored on the same episodes."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(record["group"], []).append(record)
    for group, runs in grouped.items():
        if len({r["result"]["episodes_sha256"] for r in runs}) > 1:
            raise JobsError(f"the seeds of {group} were scored on different episode lists")
        if len({json.dumps(r["stores"], sort_keys=True) for r in runs}) > 1:
            raise JobsError(f"the seeds of {group} were trained or scored on different stores")
    return {
        group: GroupSummary(runs, np.array([r["per_episode"] for r in runs], dtype=np.float64))
        for group, runs in grouped.items()
    }


def paired(a: GroupSummary, b: GroupSummary) -> Comparison:
    """A - B paired on (seed index, episode): seed k of A against seed k of B."""
    if a.per_episode.shape != b.per_episode.shape:
        raise JobsError(
            f"cannot pair runs of {len(a.records)} and {len(b.records)} seeds on "
            f"{a.per_episode.shape[1]} and {b.per_episode.shape[1]} episodes"
        )
    return compare(a.outcome(), b.outcome())
