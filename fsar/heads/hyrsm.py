"""HyRSM and HyRSM++ heads, as the CLIP-FSAR codebase's CNN_HyRSM_* / CNN_HyRSM_plusplus_* classes.

Attribute names are the release's state-dict keys (`temporal_atte_before.*`, `temporal_atte.*`,
`layer2.0`, `classification_layer`), so official weights load under the same names. The release's
fixed position table (buffer `pe.pe`) is computed here, not stored: a release checkpoint that holds
`head.pe.pe` is not yet accepted by `load_official` (the golden files leave buffers out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsar.errors import ConfigError

from .blocks import Dropout
from .hyrsm_parts import (
    FrameAttention,
    SetAttention,
    bidirectional_min_distance,
    position_code,
    temporal_regular_loss,
)
from .output import Episode, EpisodeError, FewShotHead, HeadOutput, check_class_ids
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, TrainingInputs, option

__all__ = [
    "HyRSMHead",
    "HyRSMPlusPlusHead",
    "HyRSMConfig",
    "HyRSMPlusPlusConfig",
    "SPEC",
    "SPEC_PP",
]

SetMembers = Literal["videos", "prototypes", "auto"]


# The release's dropout rates (training only): position-coded input, frame-attention output,
# set-attention weights, set-attention output.
RELEASE_DROPOUT = (0.1, 0.2, 0.1, 0.05)


class HyRSMHead(FewShotHead):
    """Hybrid relation module + set matching (HyRSM).

    1. Every video: `x * sqrt(D / position_a) + position_b * position_code`, then pre-norm frame
       self-attention (fused q|k|v) and ReLU -> s' [B,S,T,D], q' [B,Q,T,D] (`encode_frames`).
    2. Set members: the supports (`videos`, the release's 1-shot head) or the class means of s'
       (`prototypes`, its 5-shot head); `auto` takes videos when every class has one support
       (both forms are then the same). For each query, the temporal means of the M members and of
       the query pass a post-norm set attention + ReLU; every member's (and the query's) frames,
       concatenated with its set vector, go through `layer2` (1x1 conv 2D -> D). So every query
       sees its own adapted supports [B,Q,M,T,D] (`adapt`).
    3. `logits = -distance`, `bidirectional_min_distance` per member; with `videos` the class
       distance is the mean over the class's supports.

    `mid_dim` is the width (heads x dim_head) of both attentions; None = D, the release, where it
    is the feature width itself (2048 for ResNet-50, else 512).

    Frame classifier (training): with `support_class_ids [B,S]` and `query_class_ids [B,Q]`
    (training-class indices, rows of `text_table`, which is accepted and not used) the head
    returns `aux["frame_class"]`, the mean cross-entropy of `classification_layer` over the
    (S+Q)*T encoded frames against the class of each video. The release weighs it 0.6 (SSv2
    configs; 0.4 or 0.15 in others) and reads the query class ids for it (never for the logits).

    Release quirks kept: the position code's exponents (`position_code`) and the rescaling of the
    features themselves by sqrt(D / position_a); ReLU after both attentions; the 1-shot head run
    with K > 1 shots treats each support as a set member and averages its distances (`videos`).
    The release's 5-shot head needs every class in the episode (always true here); its table of
    20 position rows limits it to T <= 20 (fsar computes the code for any T); its per-frame
    classifier loss only works with USE_LOCAL (labels repeated per frame), which is what this is.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        set_members: SetMembers = "auto",
        mid_dim: int | None = None,
        heads: int = 8,
        position_a: float = 10.0,
        position_b: float = 1.0,
        dropout: bool = True,
    ):
        super().__init__()
        if set_members not in ("videos", "prototypes", "auto"):
            raise ValueError(f"set_members must be videos, prototypes or auto, got {set_members!r}")
        inner = dim if mid_dim is None else mid_dim
        if inner % heads:
            raise ValueError(f"heads={heads} must divide the attention width {inner}")
        rates = RELEASE_DROPOUT if dropout else (0.0,) * 4
        self.set_members = set_members
        self.position_scale = math.sqrt(dim / position_a)
        self.position_b = position_b
        self.position_drop = Dropout(rates[0])
        self.temporal_atte_before = FrameAttention(dim, heads, inner, rates[1])
        self.temporal_atte = SetAttention(dim, heads, inner, rates[2], rates[3])
        self.layer2 = nn.Sequential(nn.Conv1d(2 * dim, dim, kernel_size=1))
        self.classification_layer = nn.Linear(dim, num_classes)

    def encode_frames(self, x: Tensor) -> Tensor:
        """Position code, frame self-attention, ReLU: [..., T, D] -> [..., T, D]."""
        t, d = x.shape[-2:]
        code = position_code(t, d, x.device).to(x.dtype)
        frames = self.position_drop(
            x.reshape(-1, t, d) * self.position_scale + self.position_b * code
        )
        return F.relu(self.temporal_atte_before(frames)).view_as(x)

    def frame_class_logits(self, frames: Tensor) -> Tensor:
        """Per-frame training-class scores of encoded frames: [..., T, D] -> [..., T, C]."""
        return self.classification_layer(frames)

    def uses_videos(self, episode: Episode) -> bool:
        """Whether the set members are the support videos (else the class prototypes)."""
        if self.set_members == "auto":
            return episode.max_shot == 1  # every class has at least one support
        return self.set_members == "videos"

    def adapt(self, members: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Set relation per query: members [B,M,T,D], query [B,Q,T,D] ->
        (adapted members [B,Q,M,T,D], adapted queries [B,Q,T,D])."""
        b, m, _, d = members.shape
        q = query.shape[1]
        tokens = torch.cat(
            [members.mean(2)[:, None].expand(b, q, m, d), query.mean(2)[:, :, None]], dim=2
        )  # [B, Q, M+1, D]: one set per query
        sets = F.relu(self.temporal_atte(tokens.flatten(0, 1))).unflatten(0, (b, q))
        conv = self.layer2[0]
        # layer2 on [frames ; set vector] = W_frames frames + (W_set set vector + bias)
        w_frames, w_set = conv.weight[..., 0].split(d, dim=1)  # [D, D] each
        shift = F.linear(sets, w_set, conv.bias)  # [B, Q, M+1, D]
        adapted_members = F.linear(members, w_frames)[:, None] + shift[:, :, :m, None]
        adapted_query = F.linear(query, w_frames) + shift[:, :, m:]
        return adapted_members, adapted_query

    def compute(
        self,
        episode: Episode,
        support_class_ids: Tensor | None = None,
        query_class_ids: Tensor | None = None,
        text_table: Tensor | None = None,
    ) -> HeadOutput:
        support = self.encode_frames(episode.support)  # [B, S, T, D]
        query = self.encode_frames(episode.query)  # [B, Q, T, D]
        videos = self.uses_videos(episode)
        members = support if videos else episode.class_means(support)  # [B, M, T, D]
        adapted_members, adapted_query = self.adapt(members, query)
        distance = bidirectional_min_distance(adapted_members, adapted_query)  # [B, Q, M]
        if videos:
            distance = episode.class_means(distance.transpose(1, 2)).transpose(1, 2)
        aux = self.regularisers(episode, adapted_members, adapted_query)
        ids = self._class_ids(episode, support_class_ids, query_class_ids, text_table)
        if ids is not None:
            frames = torch.cat([support, query], dim=1)  # [B, S+Q, T, D]
            logits = self.frame_class_logits(frames)  # [B, S+Q, T, C]
            targets = ids[..., None].expand(-1, -1, frames.shape[2])
            aux["frame_class"] = F.cross_entropy(logits.flatten(0, 2), targets.flatten())
        return HeadOutput(-distance, aux)

    def regularisers(
        self, episode: Episode, adapted_members: Tensor, adapted_query: Tensor
    ) -> dict[str, Tensor]:
        """Extra training terms on the adapted frames (none in HyRSM)."""
        return {}

    def _class_ids(
        self,
        episode: Episode,
        support_class_ids: Tensor | None,
        query_class_ids: Tensor | None,
        text_table: Tensor | None,
    ) -> Tensor | None:
        """[B, S+Q] training-class index of every video (shapes checked); None without ids."""
        if support_class_ids is None and query_class_ids is None:
            return None
        if support_class_ids is None or query_class_ids is None:
            raise EpisodeError("the frame-class loss needs support_class_ids and query_class_ids")
        b, s, q = episode.support.shape[0], episode.support.shape[1], episode.query.shape[1]
        if support_class_ids.shape != (b, s) or query_class_ids.shape != (b, q):
            raise EpisodeError(
                f"class ids must be [B,S]=[{b},{s}] and [B,Q]=[{b},{q}], got "
                f"{list(support_class_ids.shape)} and {list(query_class_ids.shape)}"
            )
        n = self.classification_layer.out_features
        if text_table is not None and text_table.shape[0] != n:
            raise EpisodeError(
                f"text_table has {text_table.shape[0]} rows but the frame classifier {n} classes"
            )
        return torch.cat([support_class_ids, query_class_ids], dim=1).long()

    def check_inputs(
        self,
        episode: Episode,
        support_class_ids: Tensor | None = None,
        query_class_ids: Tensor | None = None,
        text_table: Tensor | None = None,
    ) -> None:
        ids = self._class_ids(episode, support_class_ids, query_class_ids, text_table)
        n = self.classification_layer.out_features
        check_class_ids(ids, n, "the training classes")


class HyRSMPlusPlusHead(HyRSMHead):
    """HyRSM++: HyRSM plus the temporal regulariser of the adapted frames.

    `aux["temporal_regular"]` (present when `query_labels` is given, i.e. in training):
    `temporal_regular_loss` over every adapted member video (per query) plus the same over the
    adapted queries; the release weighs it 0.3. The release reads `balance_coefficient = 0` as 1
    (a falsy value falls back to its default); here 0 is 0.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        window_size: int = 1,
        temporal_balance: float = 51.0,
        balance_coefficient: float = 10.0,
        **options,
    ):
        super().__init__(dim, num_classes, **options)
        self.window_size = window_size
        self.temporal_balance = temporal_balance
        self.balance_coefficient = balance_coefficient

    def regularisers(
        self, episode: Episode, adapted_members: Tensor, adapted_query: Tensor
    ) -> dict[str, Tensor]:
        if episode.query_labels is None:
            return {}
        args = (self.window_size, self.temporal_balance, self.balance_coefficient)
        per_episode = temporal_regular_loss(adapted_members, *args) + temporal_regular_loss(
            adapted_query, *args
        )
        return {"temporal_regular": per_episode.mean()}


@dataclass
class HyRSMConfig(HeadConfig):
    name: str = option("hyrsm", "few-shot head")
    aux_weights: dict[str, float] = option(
        {},
        "loss weight per auxiliary term, over the head's defaults: frame_class 0.6 (the "
        "release's SSv2 configs; 0.4 or 0.15 in its others), temporal_regular 0.3 (hyrsm_pp)",
    )
    set_members: SetMembers = option(
        "auto",
        "videos: each support is a set member, class distance = mean over its supports (the "
        "release's 1-shot head); prototypes: class-mean members (its 5-shot head); auto: videos "
        "when every class has one support, else prototypes",
    )
    mid_dim: int | None = option(
        None,
        "width of the frame and set attentions (heads x dim_head); null = the feature dim D, as "
        "the release, whose width is the feature width (2048 ResNet-50, else 512: ViT-B/16 "
        "D=512; CLIP RN50 D=1024 only fits null)",
    )
    heads: int = option(8, "attention heads of the frame and set attentions")
    position_a: float = option(10.0, "features are scaled by sqrt(D / position_a) (POSITION_A)")
    position_b: float = option(1.0, "weight of the position code (POSITION_B)")
    dropout: bool = option(
        True,
        "the release's dropout in training: 0.1 on the position-coded input, 0.2 after the frame "
        "attention, 0.1 on the set-attention weights, 0.05 after it",
    )

    def check(self) -> None:
        if self.heads < 1:
            raise ConfigError(f"head.heads must be >= 1, got {self.heads}")
        if self.mid_dim is not None and (self.mid_dim < 1 or self.mid_dim % self.heads):
            raise ConfigError(
                f"head.mid_dim must be a positive multiple of head.heads={self.heads}, "
                f"got {self.mid_dim}"
            )
        if self.position_a <= 0:
            raise ConfigError(f"head.position_a must be > 0, got {self.position_a}")


@dataclass
class HyRSMPlusPlusConfig(HyRSMConfig):
    name: str = option("hyrsm_pp", "few-shot head")
    window_size: int = option(1, "frames this close are pulled together (WINDOW_SIZE)")
    temporal_balance: float = option(
        51.0, "width of the push-apart weight beyond the window (TEMPORAL_BALANCE)"
    )
    balance_coefficient: float = option(
        10.0, "weight of the push-apart term (BALANCE_COEFFICIENT; the release reads 0 as 1)"
    )

    def check(self) -> None:
        super().check()
        if self.window_size < 0:
            raise ConfigError(f"head.window_size must be >= 0, got {self.window_size}")
        if self.temporal_balance <= 0:
            raise ConfigError(f"head.temporal_balance must be > 0, got {self.temporal_balance}")
        if self.balance_coefficient < 0:
            raise ConfigError(
                f"head.balance_coefficient must be >= 0, got {self.balance_coefficient}"
            )


def _options(config: HyRSMConfig, context: BuildContext) -> dict:
    if context.num_train_classes is None:
        raise ConfigError(
            f"head {config.name}: its per-frame classifier needs the number of training classes "
            "(BuildContext.num_train_classes), which was not given"
        )
    if config.mid_dim is None and context.feature_dim % config.heads:
        raise ConfigError(
            f"head.heads={config.heads} must divide the feature dim D={context.feature_dim} "
            "(head.mid_dim is null, i.e. D)"
        )
    return dict(
        dim=context.feature_dim,
        num_classes=context.num_train_classes,
        set_members=config.set_members,
        mid_dim=config.mid_dim,
        heads=config.heads,
        position_a=config.position_a,
        position_b=config.position_b,
        dropout=config.dropout,
    )


def _build(config: HyRSMConfig, context: BuildContext) -> HyRSMHead:
    return HyRSMHead(**_options(config, context))


def _build_pp(config: HyRSMPlusPlusConfig, context: BuildContext) -> HyRSMPlusPlusHead:
    return HyRSMPlusPlusHead(
        window_size=config.window_size,
        temporal_balance=config.temporal_balance,
        balance_coefficient=config.balance_coefficient,
        **_options(config, context),
    )


def _official(classes: str) -> OfficialKeys:
    # HyRSM and HyRSM++ checkpoints have the same keys: the markers name both (no wrong-head hint)
    return OfficialKeys(
        release=f"CLIP-FSAR codebase ({classes})",
        markers=("temporal_atte_before.", "temporal_atte."),
        wrapper_prefix="head.",
        derived=(r"pe\.pe",),  # the position table buffer: recomputed for any T
    )


def _class_ids(config: HeadConfig) -> TrainingInputs:
    return TrainingInputs(class_ids=True)


SPEC = HeadSpec(
    name="hyrsm",
    title="HyRSM",
    summary="frame + set relation modules, bidirectional mean-min matching, per-frame classifier",
    citation="Wang et al., CVPR 2022",
    config=HyRSMConfig,
    build=_build,
    head_type=HyRSMHead,
    aux_weights={"frame_class": 0.6},
    training_inputs=_class_ids,
    official=_official("CNN_HyRSM_1shot / CNN_HyRSM_5shot"),
    demo_lr=1e-4,
)

SPEC_PP = HeadSpec(
    name="hyrsm_pp",
    title="HyRSM++",
    summary="HyRSM plus a temporal-coherence regulariser of the adapted frames",
    citation="Wang et al., the extension of HyRSM",
    config=HyRSMPlusPlusConfig,
    build=_build_pp,
    head_type=HyRSMPlusPlusHead,
    aux_weights={"frame_class": 0.6, "temporal_regular": 0.3},
    training_inputs=_class_ids,
    official=_official("CNN_HyRSM_plusplus_1shot / _5shot"),
)
