"""TRX: temporal-relational cross-transformers (Perrett et al., CVPR 2021).

Follows the CLIP-FSAR codebase's `CNN_TRX` + `TemporalCrossTransformer` (checked against its
golden files, ../shared/golden/zoo `trx_*`, `trx1_*`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fsar.errors import ConfigError

from .blocks import Dropout
from .output import Episode, EpisodeError, FewShotHead, HeadOutput
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, option

__all__ = ["TRXHead", "TupleCrossTransformer", "TRXConfig", "SPEC", "frame_tuples"]

RELEASE_OUT_DIM = 1152  # CNN_TRX overwrites its cfg with this width
RELEASE_TEMPORAL_SET = (2, 3)


def frame_tuples(frames: int, size: int, device: torch.device | None = None) -> Tensor:
    """All `size`-combinations of 0..frames-1 in lexicographic order: [C(frames, size), size]."""
    return torch.combinations(torch.arange(frames, device=device), r=size)


def position_code(length: int, dim: int, scale: float, dtype: torch.dtype, device=None) -> Tensor:
    """The release's sinusoidal code times `scale`: [length, dim] (sin on even, cos on odd dims).

    Computed in `dtype` the way the release builds its float32 table, so that float32 matches it
    bit for bit.
    """
    position = torch.arange(length, dtype=dtype, device=device)[:, None]  # [L, 1]
    rate = torch.exp(
        torch.arange(0, dim, 2, dtype=dtype, device=device) * -(math.log(10000.0) / dim)
    )
    angle = position * rate  # [L, ceil(dim / 2)]
    code = torch.zeros(length, dim, dtype=dtype, device=device)
    code[:, 0::2] = torch.sin(angle) * scale
    code[:, 1::2] = torch.cos(angle[:, : dim // 2]) * scale  # an odd dim has one cos fewer
    return code


def class_slots(labels: Tensor, shots: Tensor, k_max: int) -> tuple[Tensor, Tensor]:
    """Supports regrouped by class, padded to the largest shot K = k_max (= shots.max()).

    labels [B, S], shots [B, N] -> index [B, N, K] (support indices, padding repeats a valid
    index) and valid [B, N, K] (False on padding).
    """
    order = torch.argsort(labels, dim=1, stable=True)  # [B, S], class by class
    starts = torch.cumsum(shots, 1) - shots  # [B, N] first sorted position of each class
    rank = torch.arange(k_max, device=labels.device)
    valid = rank < shots[..., None]  # [B, N, K]
    position = starts[..., None] + torch.minimum(rank, shots[..., None] - 1)
    index = torch.gather(order, 1, position.flatten(1)).view_as(position)
    return index, valid


def tuple_linear(frames: Tensor, linear: nn.Linear, tuples: Tensor) -> Tensor:
    """`linear` of each tuple's concatenated frames: [..., T, D], tuples [L, k] -> [..., L, E].

    The weight's k column blocks each project every frame once (T*k products instead of L*k),
    then each tuple sums the blocks of its frames.
    """
    k, d = tuples.shape[1], frames.shape[-1]
    e = linear.out_features
    weight = linear.weight.view(e, k, d).permute(2, 1, 0).reshape(d, k * e)  # [D, k*E]
    per_block = (frames @ weight).unflatten(-1, (k, e))  # [..., T, k, E]
    out = sum(per_block[..., tuples[:, j], j, :] for j in range(k))  # [..., L, E]
    return out + linear.bias


class TupleCrossTransformer(nn.Module):
    """One cardinality k: query tuples attend to the tuples of each class's supports.

    Keys are LayerNorm(k_linear(tuple)), values v_linear(tuple) (not normalised). Every query
    tuple takes one softmax over all (support video, tuple) pairs of a class jointly, scaled by
    1/sqrt(out_dim); the attended values form a query-specific prototype [L, out_dim], and the
    distance is its squared Frobenius distance to the query's values divided by L.
    """

    def __init__(self, dim: int, set_size: int, out_dim: int):
        super().__init__()
        self.set_size = set_size
        self.k_linear = nn.Linear(dim * set_size, out_dim)
        self.v_linear = nn.Linear(dim * set_size, out_dim)
        self.norm_k = nn.LayerNorm(out_dim)

    def forward(self, support: Tensor, query: Tensor, index: Tensor, valid: Tensor) -> Tensor:
        """support [B,S,T,D], query [B,Q,T,D] (position-coded), class slots [B,N,K] -> [B,Q,N]."""
        b, q = query.shape[:2]
        n, k_max = index.shape[1:]
        tuples = frame_tuples(query.shape[2], self.set_size, query.device)  # [L, k]
        n_tuples = tuples.shape[0]
        support_k = self.norm_k(tuple_linear(support, self.k_linear, tuples))  # [B, S, L, E]
        support_v = tuple_linear(support, self.v_linear, tuples)
        query_k = self.norm_k(tuple_linear(query, self.k_linear, tuples))  # [B, Q, L, E]
        query_v = tuple_linear(query, self.v_linear, tuples)
        e = query_k.shape[-1]

        rows = torch.arange(b, device=index.device)[:, None, None]
        class_k = support_k[rows, index].view(b, n, k_max * n_tuples, e)  # [B, N, K*L, E]
        class_v = support_v[rows, index].view(b, n, k_max * n_tuples, e)
        scores = query_k.reshape(b, 1, q * n_tuples, e) @ class_k.transpose(-1, -2)
        scores = scores / math.sqrt(e)  # [B, N, Q*L, K*L]
        padding = ~valid.repeat_interleave(n_tuples, dim=2)  # [B, N, K*L]
        scores = scores.masked_fill(padding[:, :, None], float("-inf"))
        prototype = (torch.softmax(scores, -1) @ class_v).view(b, n, q, n_tuples, e)
        diff = query_v[:, None] - prototype  # [B, N, Q, L, E]
        distance = diff.pow(2).sum((-2, -1)) / n_tuples  # [B, N, Q]
        return -distance.transpose(1, 2)


class TRXHead(FewShotHead):
    """TRX: one `TupleCrossTransformer` per tuple cardinality, logits averaged over them.

    Each frame gets a fixed sinusoidal position code (times `position_scale`) and, in training,
    dropout (drawn separately for every cardinality, as the release's one PositionalEncoding per
    cross-transformer). The input width is the feature dim D; the release ties it to its
    backbone (2048 for ResNet-50, else 512), so e.g. a D=1024 CLIP RN50 feature would not fit
    there. `max_len` (the release's position table length, int(1.5*T) for its T) only bounds T:
    the code at a position does not depend on it.

    Release quirks: `CNN_TRX` overwrites `trans_linear_out_dim = 1152` and `temp_set = [2, 3]`
    whatever its cfg says (here both are options with those defaults); its logit matrix has
    `TRAIN.WAY` columns filled by label value, leaving 0 for a class without supports (here the
    logits always cover the N episode labels, all of which have supports); `v_linear`'s bias
    cancels exactly (the prototype is a convex combination of values), so its gradient is 0.
    Classes may have unequal shot counts (padded slots are masked out of the softmax), as in the
    release's per-class loop. Loss: the mean cross-entropy of the logits, no auxiliary term. (The
    CLIP-SPM copy, `models/model_TRX.py`, has the same forward but is trained with the summed CE.)

    `cardinality_logits` gives the logits of each cardinality (the mean of which is `logits`);
    `release_tables(T)` gives the index tuples and position table the release's state dict holds.
    """

    def __init__(
        self,
        dim: int,
        temporal_set: tuple[int, ...] | list[int] = RELEASE_TEMPORAL_SET,
        out_dim: int = RELEASE_OUT_DIM,
        position_scale: float = 0.1,
        max_len: int | None = None,
        dropout: float = 0.1,
    ):
        super().__init__()
        temporal_set = list(temporal_set)
        if not temporal_set or min(temporal_set) < 1 or len(set(temporal_set)) != len(temporal_set):
            raise ValueError(f"temporal_set must be distinct sizes >= 1, got {temporal_set}")
        self.dim = dim
        self.temporal_set = temporal_set
        self.position_scale = position_scale
        self.max_len = max_len
        self.dropout = Dropout(dropout)
        self.transformers = nn.ModuleList(
            TupleCrossTransformer(dim, k, out_dim) for k in temporal_set
        )

    def cardinality_logits(self, episode: Episode) -> dict[int, Tensor]:
        """Logits [B, Q, N] of each cardinality (keys in `temporal_set` order)."""
        t, d = episode.support.shape[2:]
        if d != self.dim:
            raise EpisodeError(f"this TRX head was built for D={self.dim} features, got D={d}")
        if t < max(self.temporal_set):
            raise EpisodeError(
                f"TRX tuples of {max(self.temporal_set)} frames need T >= {max(self.temporal_set)}"
                f", got T={t}"
            )
        if self.max_len is not None and t > self.max_len:
            raise EpisodeError(f"T={t} frames exceed the position table (max_len={self.max_len})")
        code = position_code(t, d, self.position_scale, episode.support.dtype, episode.query.device)
        index, valid = class_slots(episode.support_labels, episode.shots.long(), episode.max_shot)
        logits = {}
        for k, transformer in zip(self.temporal_set, self.transformers, strict=True):
            support = self.dropout(episode.support + code)
            query = self.dropout(episode.query + code)
            logits[k] = transformer(support, query, index, valid)
        return logits

    def compute(self, episode: Episode) -> HeadOutput:
        per_cardinality = self.cardinality_logits(episode)
        return HeadOutput(torch.stack(list(per_cardinality.values())).mean(0))

    def release_tables(self, frames: int) -> dict[str, Tensor]:
        """The release's derived entries for `frames` = its DATA.NUM_INPUT_FRAMES.

        `transformers.<i>.tuples.<j>` (int64 frame indices, kept as non-trainable parameters) and
        the buffer `transformers.<i>.pe.pe` [1, max_len, D]; `to_official` leaves them out
        (they depend on T, not on training). Add them to its state dict to load it strictly.
        """
        length = self.max_len if self.max_len is not None else int(frames * 1.5)
        code = position_code(length, self.dim, self.position_scale, torch.float32)[None]
        out = {}
        for i, k in enumerate(self.temporal_set):
            for j, combination in enumerate(frame_tuples(frames, k)):
                out[f"transformers.{i}.tuples.{j}"] = combination.clone()
            out[f"transformers.{i}.pe.pe"] = code.clone()
        return out


def _unused_norm_v(head: TRXHead) -> dict[str, Tensor]:
    """The release builds `norm_v` per cardinality and never applies it (initial values)."""
    out = {}
    for i, transformer in enumerate(head.transformers):
        width = transformer.norm_k.normalized_shape[0]
        out[f"transformers.{i}.norm_v.weight"] = torch.ones(width)
        out[f"transformers.{i}.norm_v.bias"] = torch.zeros(width)
    return out


@dataclass
class TRXConfig(HeadConfig):
    name: str = option("trx", "few-shot head")
    temporal_set: list[int] = option(
        list(RELEASE_TEMPORAL_SET), "tuple cardinalities, one cross-transformer each"
    )
    out_dim: int = option(
        RELEASE_OUT_DIM, "key/value width (the release forces 1152 for every backbone)"
    )
    position_scale: float = option(0.1, "scale of the sinusoidal position code on the frames")
    max_len: int | None = option(
        None, "release position table length, bounds T (null: int(1.5*T), the release's)"
    )
    dropout: float = option(0.1, "dropout on the position-coded frames (training only)")

    def check(self) -> None:
        ks = self.temporal_set
        if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
            raise ConfigError(f"head.temporal_set must be distinct sizes >= 1, got {ks}")
        if self.out_dim < 1:
            raise ConfigError(f"head.out_dim must be >= 1, got {self.out_dim}")
        if self.max_len is not None and self.max_len < max(ks):
            raise ConfigError(
                f"head.max_len must be >= the largest tuple size {max(ks)}, got {self.max_len}"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"head.dropout must be in [0, 1), got {self.dropout}")


def build(config: TRXConfig, context: BuildContext) -> TRXHead:
    return TRXHead(
        context.feature_dim,
        temporal_set=config.temporal_set,
        out_dim=config.out_dim,
        position_scale=config.position_scale,
        max_len=config.max_len,
        dropout=config.dropout,
    )


# The release's index tuples and position table: recomputed from T, accepted and skipped on load.
_DERIVED = (r"transformers\.\d+\.tuples\.\d+", r"transformers\.\d+\.pe\.pe")

SPEC = HeadSpec(
    name="trx",
    title="TRX",
    summary="cross-attention between frame tuples (pairs and triples), as the CLIP-FSAR codebase",
    citation="Perrett et al., CVPR 2021",
    tiny={"out_dim": 64},
    # not in the demo: its Q*L x K*L tuple attention costs about 10x CLIP-FSAR per episode there
    config=TRXConfig,
    build=build,
    head_type=TRXHead,
    official=OfficialKeys(
        release="CLIP-FSAR codebase (CNN_TRX)",
        markers=("transformers.0.k_linear.",),
        unused=_unused_norm_v,
        derived=_DERIVED,
        wrapper_prefix="head.",
    ),
)
