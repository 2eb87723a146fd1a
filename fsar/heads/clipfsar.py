"""CLIP-FSAR head (SPEC 5.2), as shipped in the CLIP-SPM release."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsar.errors import ConfigError

from .blocks import TRANSFORMER_KEYS, TransformerLayer, cos_sim
from .otam import otam_distance
from .output import Episode, FewShotHead, HeadOutput, check_video_class_ids, video_class_ids
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, TrainingInputs, option

__all__ = ["CLIPFSARHead", "CLIPFSARConfig", "SPEC"]


class CLIPFSARHead(FewShotHead):
    """Text-modulated prototypes matched to transformed queries with bidirectional OTAM.

    Each support sequence gets its class text appended as token T+1 and passes the transformer
    `TX` (self-attention); the first T outputs are kept and averaged per class into prototypes
    (`merge_before=True`: supports and texts are averaged per class first, then `TX`). Queries
    pass the same `TX` on their own frames. `logits = -OTAM_bi(query, prototype)`.

    Video-text term (training): pass `support_class_ids [B,S]`, `query_class_ids [B,Q]` (rows of
    `text_table`) and `text_table [C,D]` (all training-class texts) to get
    `aux["video_text"] = CE(video_text_logits([support; query], text_table), class ids)`, the mean
    over the B*(S+Q) videos. The release weighs it by 1.2-1.5 (`video_text_loss_weight`), e.g.
    `episode_loss(out, query_labels, {"video_text": 1.5})`.

    Inference fusion (`fusion_beta` set, eval mode only): logits become the release's fused
    probabilities `p_text^beta * p_fewshot^(1-beta)` with `p_text = softmax(s * cos(mean_t q,
    class_text))` and `p_fewshot = softmax((tau - OTAM) / tau)`, `tau = fusion_temperature`
    (the release hard-codes 8, its sequence length).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        mlp_dim: int = 2048,
        merge_before: bool = False,
        attn_dropout: float = 0.2,
        ffn_dropout: float = 0.05,
        fusion_beta: float | None = None,
        fusion_temperature: float = 8.0,
    ):
        super().__init__()
        if fusion_beta is not None and not 0.0 <= fusion_beta <= 1.0:
            raise ValueError(f"fusion_beta must be in [0, 1] or None, got {fusion_beta}")
        self.merge_before = merge_before
        self.fusion_beta = fusion_beta
        self.fusion_temperature = fusion_temperature
        self.transformer = TransformerLayer(
            dim,
            heads,
            dim // heads if dim_head is None else dim_head,
            mlp_dim,
            attn_dropout,
            ffn_dropout,
        )
        self.video_text_scale = nn.Parameter(torch.ones(1))  # `s`, learnable, init 1

    def video_text_logits(self, features: Tensor, text_table: Tensor) -> Tensor:
        """`cos_sim(mean_t f, text_table) * s`: [B, V, T, D] x [C, D] -> [B, V, C]."""
        return cos_sim(features.mean(2), text_table) * self.video_text_scale

    def prototypes(self, episode: Episode) -> Tensor:
        """Text-modulated class prototypes [B, N, T, D]."""
        support, t = episode.support, episode.support.shape[2]
        if self.merge_before:
            frames, text = episode.class_means(support), episode.class_text  # [B,N,T,D], [B,N,D]
        else:
            frames, text = support, episode.support_text()  # [B,S,T,D], [B,S,D]
        tokens = torch.cat([frames, text[:, :, None]], dim=2)  # [B, X, T+1, D]
        out = self.transformer(tokens.flatten(0, 1))[:, :t].unflatten(0, tokens.shape[:2])
        return out if self.merge_before else episode.class_means(out)

    def compute(
        self,
        episode: Episode,
        support_class_ids: Tensor | None = None,
        query_class_ids: Tensor | None = None,
        text_table: Tensor | None = None,
    ) -> HeadOutput:
        query = self.transformer(episode.query.flatten(0, 1)).view_as(episode.query)
        distance = otam_distance(query, self.prototypes(episode))  # [B, Q, N]
        logits = -distance
        if self.fusion_beta is not None and not self.training:
            logits = self.fuse_with_text(distance, episode)
        aux = {}
        ids = video_class_ids(
            episode, support_class_ids, query_class_ids, text_table, "the video-text loss"
        )
        if ids is not None:
            videos = torch.cat([episode.support, episode.query], dim=1)  # [B, S+Q, T, D]
            logits_text = self.video_text_logits(videos, text_table)  # [B, S+Q, C]
            aux["video_text"] = F.cross_entropy(logits_text.flatten(0, 1), ids.flatten())
        return HeadOutput(logits, aux)

    def check_inputs(
        self,
        episode: Episode,
        support_class_ids: Tensor | None = None,
        query_class_ids: Tensor | None = None,
        text_table: Tensor | None = None,
    ) -> None:
        check_video_class_ids(
            episode, support_class_ids, query_class_ids, text_table, "the video-text loss"
        )

    def fuse_with_text(self, distance: Tensor, episode: Episode) -> Tensor:
        """Release inference fusion of OTAM distances [B,Q,N] with the text probability."""
        image = F.normalize(episode.query.mean(2), dim=-1, eps=0.0)  # [B, Q, D]
        text = F.normalize(episode.class_text, dim=-1, eps=0.0)  # [B, N, D]
        p_text = torch.softmax(self.video_text_scale * image @ text.transpose(1, 2), dim=-1)
        tau = self.fusion_temperature
        p_fewshot = torch.softmax((tau - distance) / tau, dim=-1)
        return p_text.pow(self.fusion_beta) * p_fewshot.pow(1.0 - self.fusion_beta)


@dataclass
class CLIPFSARConfig(HeadConfig):
    name: str = option("clipfsar", "few-shot head")
    heads: int = option(8, "attention heads of the transformer layer")
    dim_head: int | None = option(None, "width of one attention head (default: dim / heads)")
    mlp_dim: int = option(2048, "hidden width of the feed-forward block")
    attn_dropout: float = option(0.2, "attention dropout (training only)")
    ffn_dropout: float = option(0.05, "feed-forward dropout (training only)")
    merge_before: bool = option(False, "average supports per class before the transformer")
    fusion_beta: float | None = option(
        None, "test-time fusion with the text probability (null = off)"
    )

    def check(self) -> None:
        if self.fusion_beta is not None and not 0 <= self.fusion_beta <= 1:
            raise ConfigError(f"head.fusion_beta must be in [0, 1] or null, got {self.fusion_beta}")


def build(config: CLIPFSARConfig, context: BuildContext) -> CLIPFSARHead:
    return CLIPFSARHead(
        context.feature_dim,
        heads=config.heads,
        dim_head=config.dim_head,
        mlp_dim=config.mlp_dim,
        merge_before=config.merge_before,
        attn_dropout=config.attn_dropout,
        ffn_dropout=config.ffn_dropout,
        fusion_beta=config.fusion_beta,
    )


SPEC = HeadSpec(
    name="clipfsar",
    title="CLIP-FSAR",
    summary="text-modulated prototypes + bidirectional OTAM, video-text loss (CLIP-SPM copy)",
    citation="Wang et al., IJCV 2023",
    config=CLIPFSARConfig,
    build=build,
    head_type=CLIPFSARHead,
    aux_weights={"video_text": 1.0},
    training_inputs=lambda config: TrainingInputs(class_ids=True),
    official=OfficialKeys(
        release="CLIP-FSAR",
        prefixes=(
            ("context2.", "transformer.", TRANSFORMER_KEYS),
            ("scale", "video_text_scale", (("", ""),)),
        ),
        markers=("context2.",),
    ),
    tiny={"heads": 4, "dim_head": 16, "mlp_dim": 128},
    # On the demo's random-init features it overfits within ~50 steps at higher rates.
    demo_lr=3e-5,
    published_key="clip_fsar",
)
