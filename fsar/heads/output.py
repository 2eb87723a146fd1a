"""What every head returns, and the one place episode inputs are checked.

All heads share one calling convention::

    head(support [B,S,T,D], support_labels [B,S], query [B,Q,T,D], class_text [B,N,D],
         query_labels=None, **head_specific) -> HeadOutput(logits [B,Q,N], aux)

`Episode.checked` validates those tensors once and carries the derived quantities (number of
classes N, per-class support weights) that the heads need, so each head only does its own maths.
`FewShotHead.episode` runs every check that reads tensor values (label and id ranges, shot
counts) and `FewShotHead.compute` is pure tensor maths on the checked episode: `torch.compile`
traces `compute` without graph breaks (`fsar.pipelines.compiled`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HeadOutput",
    "Episode",
    "EpisodeError",
    "FewShotHead",
    "episode_loss",
    "check_class_ids",
    "check_video_class_ids",
]


class EpisodeError(ValueError):
    """Raised when the tensors handed to a head do not form a valid batch of episodes."""


@dataclass
class HeadOutput:
    """Result of a head on a batch of B episodes.

    logits: [B, Q, N] class scores; column n is episode label n. Never depends on query labels.
    aux: named scalar auxiliary losses (each the mean over the B episodes). Present only when
        the training-only inputs they need were given (e.g. `query_labels`).
    """

    logits: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)


def episode_loss(
    output: HeadOutput, query_labels: Tensor, aux_weights: Mapping[str, float] | None = None
) -> Tensor:
    """`w * CE(logits)` over all B*Q queries plus `sum_k aux_weights[k] * aux[k]`.

    `w = aux_weights["logits"]` (1 when absent): a head whose release trains on other terms only
    sets it to 0. Auxiliary terms named in `aux_weights` but absent from `output.aux` are an
    error, so a loss weight never silently applies to nothing.
    """
    weights = dict(aux_weights or {})
    logits_weight = weights.pop("logits", 1.0)
    logits = output.logits
    loss = logits.new_zeros(())
    if logits_weight:
        loss = logits_weight * F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), query_labels.reshape(-1).long()
        )
    for name, weight in weights.items():
        if name not in output.aux:
            raise KeyError(f"aux loss {name!r} not in head output; present: {sorted(output.aux)}")
        loss = loss + weight * output.aux[name]
    return loss


def _shape(t: Tensor) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


def _check_labels(name: str, labels: Tensor, n_way: int) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise EpisodeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_way):
        raise EpisodeError(
            f"{name} must lie in 0..{n_way - 1} (N={n_way} classes from class_text), "
            f"got values in {int(labels.min())}..{int(labels.max())}"
        )


def check_class_ids(ids: Tensor | None, rows: int, what: str) -> None:
    """Raise EpisodeError unless every class id lies in 0..rows-1 (`what` names the rows)."""
    if ids is not None and ids.numel():
        low, high = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
        if low < 0 or high >= rows:
            raise EpisodeError(f"class ids must lie in 0..{rows - 1} ({what}), got {low}..{high}")


def video_class_ids(
    episode: Episode,
    support_class_ids: Tensor | None,
    query_class_ids: Tensor | None,
    text_table: Tensor | None,
    term: str,
) -> Tensor | None:
    """The [B, S+Q] `text_table` row of every video of the episode (shapes checked), or None
    when no class ids are given; `term` names the training term that needs them."""
    given = [x is not None for x in (support_class_ids, query_class_ids, text_table)]
    if not any(given):
        return None
    if not all(given):
        raise EpisodeError(
            f"{term} needs support_class_ids, query_class_ids and text_table together"
        )
    b, s, _, d = episode.support.shape
    q = episode.query.shape[1]
    if support_class_ids.shape != (b, s) or query_class_ids.shape != (b, q):
        raise EpisodeError(
            f"class ids must be [B,S]=[{b},{s}] and [B,Q]=[{b},{q}], got "
            f"{list(support_class_ids.shape)} and {list(query_class_ids.shape)}"
        )
    if text_table.dim() != 2 or text_table.shape[1] != d:
        raise EpisodeError(f"text_table must be [C,D={d}], got {list(text_table.shape)}")
    return torch.cat([support_class_ids, query_class_ids], dim=1).long()


def check_video_class_ids(
    episode: Episode,
    support_class_ids: Tensor | None,
    query_class_ids: Tensor | None,
    text_table: Tensor | None,
    term: str,
) -> None:
    """The eager checks of `video_class_ids`' inputs (a head's `check_inputs`), including that
    every id is a row of `text_table`."""
    ids = video_class_ids(episode, support_class_ids, query_class_ids, text_table, term)
    if ids is not None:
        check_class_ids(ids, text_table.shape[0], "rows of text_table")


@dataclass
class Episode:
    """A checked batch of B episodes (shapes in the field comments)."""

    support: Tensor  # [B, S, T, D]
    support_labels: Tensor  # [B, S] int64 in 0..N-1
    query: Tensor  # [B, Q, T, D]
    class_text: Tensor  # [B, N, D]
    query_labels: Tensor | None  # [B, Q] int64 in 0..N-1, training only
    shots: Tensor  # [B, N] number of supports of each class (all >= 1)
    class_weights: Tensor  # [B, N, S] = one_hot(labels)^T / shots: class_weights @ x = class means
    max_shot: int  # largest shot count: a Python int, so that shapes built from it are static

    @property
    def n_way(self) -> int:
        return self.class_text.shape[1]

    @property
    def equal_shots(self) -> bool:
        return bool((self.shots == self.shots[:, :1]).all())

    def class_means(self, x: Tensor) -> Tensor:
        """Per-class mean over the supports: x [B, S, *rest] -> [B, N, *rest]."""
        b, s = x.shape[:2]
        flat = x.reshape(b, s, -1)  # [B, S, R]
        return torch.bmm(self.class_weights.to(x.dtype), flat).reshape(b, self.n_way, *x.shape[2:])

    def support_text(self) -> Tensor:
        """Text embedding of each support's class: [B, S, D]."""
        return _gather_rows(self.class_text, self.support_labels)

    def query_text(self) -> Tensor:
        """Text embedding of each query's true class (training only): [B, Q, D]."""
        if self.query_labels is None:
            raise EpisodeError("query_labels are needed for the query class text")
        return _gather_rows(self.class_text, self.query_labels)

    @classmethod
    def checked(
        cls,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
        class_text: Tensor,
        query_labels: Tensor | None = None,
        *,
        require_equal_shots: bool = False,
    ) -> Episode:
        """Validate the inputs of a head; raise one EpisodeError that names the problem."""
        if support.dim() != 4 or query.dim() != 4:
            raise EpisodeError(
                "support and query must be [B,S,T,D] and [B,Q,T,D] "
                f"(add a leading episode dimension B=1 for one episode), "
                f"got support {_shape(support)} and query {_shape(query)}"
            )
        if class_text.dim() != 3:
            raise EpisodeError(f"class_text must be [B,N,D], got {_shape(class_text)}")
        b, s, t, d = support.shape
        bq, _, tq, dq = query.shape
        if bq != b or class_text.shape[0] != b:
            raise EpisodeError(
                f"episode counts differ: support {_shape(support)}, query {_shape(query)}, "
                f"class_text {_shape(class_text)}"
            )
        if tq != t:
            raise EpisodeError(f"support has T={t} frames but query has T={tq}")
        if dq != d or class_text.shape[2] != d:
            raise EpisodeError(
                f"feature dims differ: support D={d}, query D={dq}, "
                f"class_text D={class_text.shape[2]}"
            )
        if support_labels.shape != (b, s):
            raise EpisodeError(
                f"support_labels must be [B,S]=[{b},{s}], got {_shape(support_labels)}"
            )
        n_way = class_text.shape[1]
        _check_labels("support_labels", support_labels, n_way)
        if query_labels is not None:
            if query_labels.shape != query.shape[:2]:
                raise EpisodeError(
                    f"query_labels must be [B,Q]={list(query.shape[:2])}, "
                    f"got {_shape(query_labels)}"
                )
            _check_labels("query_labels", query_labels, n_way)
            query_labels = query_labels.long()
        support_labels = support_labels.long()
        one_hot = F.one_hot(support_labels, n_way).transpose(1, 2).to(support.dtype)  # [B, N, S]
        shots = one_hot.sum(-1)  # [B, N]
        fewest, most = 1, 0  # no episodes
        if shots.numel():
            fewest, most = (int(v) for v in torch.stack(torch.aminmax(shots)).tolist())
        if fewest == 0:
            ep, cls_ = (shots == 0).nonzero()[0].tolist()
            raise EpisodeError(
                f"class {cls_} of episode {ep} has no support video; every label 0..{n_way - 1} "
                "needs at least one support"
            )
        episode = cls(
            support,
            support_labels,
            query,
            class_text,
            query_labels,
            shots,
            one_hot / shots[..., None],
            most,
        )
        if require_equal_shots and not episode.equal_shots:
            raise EpisodeError(
                "this head (PADM) needs the same number of supports in every class, got shots "
                f"{shots.long().tolist()}"
            )
        return episode


def _gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """table [B, N, D], index [B, K] -> [B, K, D]."""
    return torch.gather(table, 1, index[..., None].expand(-1, -1, table.shape[-1]))


class FewShotHead(nn.Module):
    """Base of all heads: checks the episode, then hands it to `compute`.

    Subclasses implement `compute(episode, **head_specific) -> HeadOutput` and set
    `require_equal_shots` when their maths needs K supports in every class. Checks of their
    own inputs that read tensor values (index ranges) go in `check_inputs`, so that `compute`
    reads no tensor value into Python (shape checks may stay in `compute`: they cost nothing
    under `torch.compile`).
    """

    require_equal_shots: bool = False

    def forward(
        self,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
        class_text: Tensor,
        query_labels: Tensor | None = None,
        **head_specific: Tensor,
    ) -> HeadOutput:
        episode = self.episode(
            support, support_labels, query, class_text, query_labels, **head_specific
        )
        return self.compute(episode, **head_specific)

    def episode(
        self,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
        class_text: Tensor,
        query_labels: Tensor | None = None,
        **head_specific: Tensor,
    ) -> Episode:
        """The checked episode of `forward`'s inputs (every check that reads tensor values)."""
        episode = Episode.checked(
            support,
            support_labels,
            query,
            class_text,
            query_labels,
            require_equal_shots=self.require_equal_shots,
        )
        self.check_inputs(episode, **head_specific)
        return episode

    def check_inputs(self, episode: Episode, **head_specific: Tensor) -> None:
        """Value checks of the head-specific inputs (none by default); raise EpisodeError."""

    def compute(self, episode: Episode) -> HeadOutput:  # pragma: no cover - abstract
        raise NotImplementedError
