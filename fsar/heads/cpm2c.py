"""CLIP-CPM2C head: the CLIP-SPM release's `CLIP_CPMMC_FSAR` (models/model_cpm2c.py).

Two branches share one text-video fusion (gates + transformer `context2`): appearance (the frames)
and motion (multi-scale temporal convolutions, then forward/backward differences). In each, a
video becomes `[token ; fused frames]` after the fusion; supports take their class text as token,
queries a learned token. Local distance: bidirectional OTAM (lambda 0.5) between class means of
the support frames and the query frames; global distance: `1 - cos_sim` of every query position
to each support's token output, summed over positions and over the class's supports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsar.errors import ConfigError

from .blocks import GATE_KEYS, TRANSFORMER_KEYS, TransformerLayer, cos_sim
from .clipspm_parts import TextVideoFusion, squared_distance
from .cpm2c_parts import MultiScaleMotion, release_only_entries
from .otam import otam_distance
from .output import (
    Episode,
    EpisodeError,
    FewShotHead,
    HeadOutput,
    check_video_class_ids,
    video_class_ids,
)
from .spec import (
    LOGITS_TERM,
    BuildContext,
    HeadConfig,
    HeadSpec,
    OfficialKeys,
    TrainingInputs,
    option,
)

__all__ = ["CPM2CHead", "CPM2CConfig", "CPM2CScores", "SPEC"]

# The release's loss weights: lambdas0..2 of its run params (the configs' LMD [0.5, 1, 0]) and the
# 0.001 of the consistency term. It never takes the cross-entropy of the combined logits.
AUX_WEIGHTS = {
    LOGITS_TERM: 0.0,
    "classification": 0.5,
    "local": 1.0,
    "global": 0.0,
    "consistency": 0.001,
}


@dataclass
class CPM2CScores:
    """What one call computes beyond the combined logits (shapes in the comments)."""

    logits_local: Tensor  # [B, Q, N] -(normal_coff * OTAM appearance + motion_coff * OTAM motion)
    logits_global: Tensor  # [B, Q, N] the same with the global (token) distances
    consistency: Tensor | None  # [B] release `target_consist_distance`; needs query_labels


class CPM2CHead(FewShotHead):
    """CLIP-CPM2C few-shot head.

    `logits = local_weight * logits_local + global_weight * logits_global` (the release's
    lambdas1, lambdas2: 1 and 0). They never read query labels or class ids: queries are fused
    with the learned tokens only.

    Auxiliary terms (per-episode values as the release, then the mean over the B episodes):
    - `aux["classification"]`: summed cross-entropy over the S+Q videos of
      `video_text_logits(videos, text_table)` against their rows of `text_table` (present when
      `support_class_ids`, `query_class_ids` and `text_table` are given);
    - `aux["local"]`, `aux["global"]`: summed cross-entropy over the queries of `logits_local`,
      `logits_global` (with `query_labels`);
    - `aux["consistency"]` (with `query_labels`): `mean_q |q(learned) - q(query class text)|^2 +
      mean_s |s(class text) - s(learned)|^2` over the `[token ; frames]` outputs, weighted
      `normal_coff` / `motion_coff` per branch.
    The release's loss is `episode_loss(out, query_labels, SPEC.aux_weights)`: lambdas0..2 =
    (0.5, 1, 0) on the three summed cross-entropies, 0.001 on the consistency, and no
    cross-entropy of `logits` (weight 0).

    Release quirks and how fsar handles them:
    - It cannot run as shipped: run/run.py's params lack `motion_residual_ratio`, `lambdas0..3`
      and the prompt sizes the model reads. Chosen: motion_residual_ratio 0.5 and lambdas
      (0.5, 1, 0) from the configs' `LMD: [0.5, 1, 0]`, a key its code never reads.
    - One lambda weighs both a logit term and its loss term (lambdas1: local, lambdas2: global).
      fsar keeps the two jobs apart: `local_weight`/`global_weight` combine the logits, the aux
      weights `local`/`global` weigh the losses; the defaults are the release's.
    - The forward reads the query class ids (`real_target_labels`) in eval too, but they reach
      only the consistency term (training). fsar takes the query text from `class_text` with
      `query_labels`, in training only; the logits read neither.
    - The global distance sums over a class's supports (it grows with the shot, so with unequal
      shots it favours the classes with fewer supports) and includes the token position. It
      is off by default (global_weight 0), as in the release.
    - Cross-entropies are sums over the rows of an episode (CLIP-SPM `utils.loss`), not means.
    - The release's soft-min in OTAM has no max-shift (it underflows in float32 for large
      costs); fsar's log-sum-exp OTAM equals it wherever the release is finite.
    - The classification logits use the raw frame mean (its `classification_layer` is empty)
      against the whole text table (training classes in training).
    - Built but unused on features: the 6-layer temporal transformer, its position embedding and
      the pixel prompt networks (`release_only_entries`: accepted on load, placeholders back).
    - Switches its configs never set are not implemented: MERGE_BEFORE, SINGLE_DIRECT,
      USE_CONTRASTIVE, TRANSFORMER_DEPTH.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        mlp_dim: int = 2048,
        gate_text_ratio: float = 1.5,
        gate_vision_ratio: float = 0.5,
        negative_slope: float = 0.0025,
        alpha: float = 0.2,
        motion_residual_ratio: float = 0.5,
        normal_coff: float = 1.0,
        motion_coff: float = 1.0,
        local_weight: float = 1.0,
        global_weight: float = 0.0,
        attn_dropout: float = 0.2,
        ffn_dropout: float = 0.05,
    ):
        super().__init__()
        transformer = TransformerLayer(
            dim,
            heads,
            dim // heads if dim_head is None else dim_head,
            mlp_dim,
            attn_dropout,
            ffn_dropout,
        )
        self.fusion = TextVideoFusion(
            transformer, dim, gate_text_ratio, gate_vision_ratio, negative_slope, alpha
        )
        self.motion = MultiScaleMotion(dim, motion_residual_ratio)
        self.appearance_token = nn.Parameter(torch.randn(1, 1, dim))
        self.motion_token = nn.Parameter(torch.randn(1, 1, dim))
        self.video_text_scale = nn.Parameter(torch.ones(1))  # release `scale`, init 1
        self.normal_coff = normal_coff
        self.motion_coff = motion_coff
        self.local_weight = local_weight
        self.global_weight = global_weight

    def video_text_logits(self, videos: Tensor, text_table: Tensor) -> Tensor:
        """`cos_sim(mean_t v, text_table) * scale`: [B, V, T, D] x [C, D] -> [B, V, C]."""
        return cos_sim(videos.mean(2), text_table) * self.video_text_scale

    def scores(self, episode: Episode) -> CPM2CScores:
        """Local and global logits of both branches, and the consistency with query labels."""
        if episode.support.shape[2] < 2:
            raise EpisodeError("CPM2C's motion branch needs at least T=2 frames")
        n_support = episode.support.shape[1]
        videos = torch.cat([episode.support, episode.query], dim=1)  # [B, S+Q, T, D]
        motion = self.motion(videos.flatten(0, 1)).unflatten(0, videos.shape[:2])
        local = global_ = consistency = 0.0
        for frames, token, coff in (
            (videos, self.appearance_token, self.normal_coff),
            (motion, self.motion_token, self.motion_coff),
        ):
            d_local, d_global, d_consistency = self._branch(
                episode, frames[:, :n_support], frames[:, n_support:], token[0, 0]
            )
            local = local + coff * d_local
            global_ = global_ + coff * d_global
            if d_consistency is not None:
                consistency = consistency + coff * d_consistency
        with_labels = episode.query_labels is not None
        return CPM2CScores(-local, -global_, consistency if with_labels else None)

    def _fuse(self, frames: Tensor, tokens: Tensor) -> Tensor:
        """`[token ; fused frames]` after `context2`: frames [B,V,T,D], tokens [B,V,D] ->
        [B, V, T+1, D]."""
        fused, fused_token = self.fusion(frames.flatten(0, 1), tokens.flatten(0, 1))
        return torch.cat([fused_token[:, None], fused], dim=1).unflatten(0, frames.shape[:2])

    def _branch(
        self, episode: Episode, support: Tensor, query: Tensor, token: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Distances [B,Q,N] (local, global) and consistency [B] of one branch.

        support [B,S,T',D], query [B,Q,T',D], token [D] (the branch's learned token)."""
        b, s, q = support.shape[0], support.shape[1], query.shape[1]
        frames = [support, query]
        tokens = [episode.support_text(), token.expand(b, q, -1)]
        with_labels = episode.query_labels is not None
        if with_labels:  # the "contra" views, only for the consistency term
            frames += [support, query]
            tokens += [token.expand(b, s, -1), episode.query_text()]
        fused = self._fuse(torch.cat(frames, dim=1), torch.cat(tokens, dim=1))
        parts = fused.split([x.shape[1] for x in frames], dim=1)
        support_rep, query_rep = parts[0], parts[1]  # [B, S, T'+1, D], [B, Q, T'+1, D]

        local = otam_distance(query_rep[:, :, 1:], episode.class_means(support_rep[:, :, 1:]))
        positions = query_rep.shape[2]
        per_support = 1 - cos_sim(query_rep.flatten(1, 2), support_rep[:, :, 0])  # [B,Q*(T'+1),S]
        per_support = per_support.unflatten(1, (q, positions)).sum(2)  # [B, Q, S]
        one_hot = F.one_hot(episode.support_labels, episode.n_way).to(per_support.dtype)
        global_ = per_support @ one_hot  # summed over the class's supports: [B, Q, N]

        consistency = None
        if with_labels:
            support_learned, query_text = parts[2], parts[3]
            consistency = _mean_squared_distance(query_rep, query_text) + _mean_squared_distance(
                support_rep, support_learned
            )
        return local, global_, consistency

    def compute(
        self,
        episode: Episode,
        support_class_ids: Tensor | None = None,
        query_class_ids: Tensor | None = None,
        text_table: Tensor | None = None,
    ) -> HeadOutput:
        scores = self.scores(episode)
        logits = self.local_weight * scores.logits_local + self.global_weight * scores.logits_global
        aux: dict[str, Tensor] = {}
        ids = video_class_ids(
            episode, support_class_ids, query_class_ids, text_table, "the classification term"
        )
        if ids is not None:
            videos = torch.cat([episode.support, episode.query], dim=1)
            aux["classification"] = _summed_ce(self.video_text_logits(videos, text_table), ids)
        if episode.query_labels is not None:
            aux["local"] = _summed_ce(scores.logits_local, episode.query_labels)
            aux["global"] = _summed_ce(scores.logits_global, episode.query_labels)
            aux["consistency"] = scores.consistency.mean()
        return HeadOutput(logits, aux)

    def check_inputs(
        self,
        episode: Episode,
        support_class_ids: Tensor | None = None,
        query_class_ids: Tensor | None = None,
        text_table: Tensor | None = None,
    ) -> None:
        check_video_class_ids(
            episode, support_class_ids, query_class_ids, text_table, "the classification term"
        )


def _mean_squared_distance(x: Tensor, y: Tensor) -> Tensor:
    """Mean over the videos of `|x - y|_F^2`: [B, V, L, D] twice -> [B]."""
    return squared_distance(x.flatten(0, 1), y.flatten(0, 1)).view(x.shape[:2]).mean(1)


def _summed_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy summed over the rows of each episode (the release's `utils.loss`), then the
    mean over the B episodes: logits [B, R, C], labels [B, R] -> scalar."""
    summed = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    return summed / logits.shape[0]


@dataclass
class CPM2CConfig(HeadConfig):
    name: str = option("cpm2c", "few-shot head")
    heads: int = option(8, "attention heads of the fusion transformer")
    dim_head: int | None = option(
        None,
        "width of one attention head (default: dim / heads, the release's D/8: 64 for "
        "ViT-B/16 D=512, 128 for RN50 D=1024)",
    )
    mlp_dim: int = option(2048, "hidden width of the fusion transformer's FFN (release 2048)")
    attn_dropout: float = option(0.2, "attention dropout (training only)")
    ffn_dropout: float = option(0.05, "feed-forward dropout (training only)")
    mid_dim_text: float = option(1.5, "text gate width ratio (release mid_dim_text)")
    mid_dim_vision: float = option(0.5, "vision gate width ratio (release mid_dim_vision)")
    negative_slope: float = option(0.0025, "LeakyReLU slope of the gates")
    alpha: float = option(0.2, "weight of the gated token in the fusion (release alpha)")
    motion_residual_ratio: float = option(
        0.5,
        "weight of the multi-scale convolutions over the raw frames (the release's run.py "
        "lacks the key; 0.5 chosen)",
    )
    normal_coff: float = option(
        1.0, "weight of the appearance branch (release NORMAL_COFF, 1 in all its cpm2c configs)"
    )
    motion_coff: float = option(
        1.0, "weight of the motion branch (release MOTION_COFF: 1, but 0 in configs/cpm2c/ucf.yaml)"
    )
    local_weight: float = option(
        1.0,
        "weight of the local (OTAM) logits in the logits (release lambdas1, which it also "
        "uses as the loss weight aux_weights.local)",
    )
    global_weight: float = option(
        0.0,
        "weight of the global (token) logits in the logits (release lambdas2, also its "
        "loss weight aux_weights.global)",
    )

    def check(self) -> None:
        for key in ("heads", "mlp_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"head.{key} must be >= 1, got {getattr(self, key)}")
        if self.dim_head is not None and self.dim_head < 1:
            raise ConfigError(f"head.dim_head must be >= 1 or null, got {self.dim_head}")
        for key in ("attn_dropout", "ffn_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"head.{key} must be in [0, 1), got {getattr(self, key)}")
        for key in ("mid_dim_text", "mid_dim_vision"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"head.{key} must be > 0, got {getattr(self, key)}")


def build(config: CPM2CConfig, context: BuildContext) -> CPM2CHead:
    return CPM2CHead(
        context.feature_dim,
        heads=config.heads,
        dim_head=config.dim_head,
        mlp_dim=config.mlp_dim,
        gate_text_ratio=config.mid_dim_text,
        gate_vision_ratio=config.mid_dim_vision,
        negative_slope=config.negative_slope,
        alpha=config.alpha,
        motion_residual_ratio=config.motion_residual_ratio,
        normal_coff=config.normal_coff,
        motion_coff=config.motion_coff,
        local_weight=config.local_weight,
        global_weight=config.global_weight,
        attn_dropout=config.attn_dropout,
        ffn_dropout=config.ffn_dropout,
    )


def _same(official: str, ours: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    return (official, ours, (("", ""),))


SPEC = HeadSpec(
    name="cpm2c",
    title="CLIP-CPM2C",
    summary="text-gated fusion of appearance and multi-scale motion, OTAM + token distances "
    "(CLIP-SPM release's CLIP_CPMMC_FSAR)",
    citation="CLIP-SPM release, models/model_cpm2c.py",
    tiny={"heads": 4, "dim_head": 16, "mlp_dim": 128},
    config=CPM2CConfig,
    build=build,
    head_type=CPM2CHead,
    aux_weights=AUX_WEIGHTS,
    training_inputs=lambda config: TrainingInputs(class_ids=True),
    official=OfficialKeys(
        release="CLIP-SPM (CLIP_CPMMC_FSAR)",
        prefixes=(
            ("context2.", "fusion.transformer.", TRANSFORMER_KEYS),
            ("gate_text.", "fusion.text_gate.", GATE_KEYS),
            ("gate_vision.", "fusion.vision_gate.", GATE_KEYS),
            _same("class_token_motion", "motion_token"),
            _same("class_token", "appearance_token"),
            _same("motion_conv1_1.", "motion.conv_k1."),
            _same("motion_conv1_3.", "motion.conv_k3."),
            _same("motion_conv1_5.", "motion.conv_dilated."),
            _same("scale_conv.", "motion.merge."),
            _same("scale", "video_text_scale"),
        ),
        markers=(
            "class_token",
            "class_token_motion",
            "motion_conv1_1.",
            "motion_conv1_3.",
            "motion_conv1_5.",
            "scale_conv.",
        ),
        unused=release_only_entries,
    ),
)
