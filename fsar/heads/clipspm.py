"""CLIP-SPM head (SPEC 5.3): HSMR + SPM + PADM, equal to the official release."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fsar.errors import ConfigError

from .blocks import GATE_KEYS, TRANSFORMER_KEYS, TransformerLayer
from .clipspm_parts import (
    HSMR,
    PADM,
    ClassMeanOTAM,
    PromptGenerator,
    TextVideoFusion,
    squared_distance,
)
from .otam import otam_distance
from .output import Episode, EpisodeError, FewShotHead, HeadOutput
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, TrainingInputs, option

__all__ = ["CLIPSPMHead", "CLIPSPMConfig", "SPEC", "SPM_CHOICES", "parse_hsmr_source"]

SPM_CHOICES = ("generated", "none")


def parse_hsmr_source(source: str) -> str | None:
    """'final' -> None (shallow level = final embedding); 'layer:<name>' -> '<name>'."""
    if source == "final":
        return None
    if source.startswith("layer:") and len(source) > len("layer:"):
        return source[len("layer:") :]
    raise ValueError(f"hsmr_source must be 'final' or 'layer:<name>', got {source!r}")


class CLIPSPMHead(FewShotHead):
    """CLIP-SPM few-shot head.

    logits = -(0.5 * D1 + D2) with `D1 = OTAM_bi(class means of s_r, q_g)` (SPM) and `D2` from
    PADM. Auxiliary terms (present when `query_labels` is given; means over the B episodes):

    - `aux["motion_consistency"] = motion_alpha * L_hsmr` (if `hsmr`);
    - `aux["consistency"]`, `aux["text_distance"]`: the paper's prompt-consistency terms times
      `consistency_weight` / `text_distance_weight` (computed only when the weight is > 0; the
      release has them off).

    The release's loss for one episode is `CE(logits) + 0.001 * sum(aux.values())`
    (`episode_loss(out, query_labels, {k: 0.001 for k in out.aux})`). The release accumulates
    `CE / tasks_per_batch + 0.001 * aux` over its tasks, so the aux terms are summed, not averaged,
    over a batch: with B episodes in one call (aux = episode mean) use weight `0.001 * B`.

    Ablation switches: `hsmr` (motion regulariser on/off), `hsmr_source` (`final`, or
    `layer:<name>` with `shallow_dim` and the `support_shallow`/`query_shallow` inputs), `spm`
    (`generated` prompts, or `none`: no text, frames pass `TX2` alone), `padm` (off: `D2` is
    OTAM between class means of `s_r` and `q_g`, without refinement or anchors).
    `motion_alpha` is fixed unless `motion_alpha_learnable` (the release learns it).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 256,
        mlp_dim: int = 2048,
        prompt_hidden: int = 2048,
        gate_text_ratio: float = 1.5,
        gate_vision_ratio: float = 0.5,
        negative_slope: float = 0.0025,
        fusion_alpha: float = 0.2,
        motion_alpha: float = 1.0,
        motion_alpha_learnable: bool = False,
        hsmr: bool = True,
        hsmr_source: str = "final",
        shallow_dim: int | None = None,
        spm: str = "generated",
        padm: bool = True,
        consistency_weight: float = 0.0,
        text_distance_weight: float = 0.0,
        consistency_query_share: float = 0.54,
        text_distance_query_share: float = 0.07,
        attn_dropout: float = 0.2,
        ffn_dropout: float = 0.05,
    ):
        super().__init__()
        if spm not in SPM_CHOICES:
            raise ValueError(f"spm must be one of {SPM_CHOICES}, got {spm!r}")
        self.hsmr_layer = parse_hsmr_source(hsmr_source)
        if (self.hsmr_layer is None) != (shallow_dim is None):
            raise ValueError("shallow_dim is needed exactly when hsmr_source is 'layer:<name>'")
        if spm == "none" and (consistency_weight or text_distance_weight):
            raise ValueError(
                "the consistency terms compare generated prompts: they need spm='generated'"
            )

        def transformer() -> TransformerLayer:
            return TransformerLayer(dim, heads, dim_head, mlp_dim, attn_dropout, ffn_dropout)

        self.fusion = TextVideoFusion(
            transformer(), dim, gate_text_ratio, gate_vision_ratio, negative_slope, fusion_alpha
        )
        self.prompt_generator = (
            PromptGenerator(dim, prompt_hidden, ffn_dropout) if spm == "generated" else None
        )
        self.padm = PADM(transformer()) if padm else ClassMeanOTAM()
        self.require_equal_shots = padm
        self.hsmr = HSMR(dim, shallow_dim) if hsmr else None
        alpha = torch.tensor(float(motion_alpha))
        if motion_alpha_learnable:
            self.motion_alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("motion_alpha", alpha)
        self.consistency_weight = consistency_weight
        self.text_distance_weight = text_distance_weight
        self.consistency_query_share = consistency_query_share
        self.text_distance_query_share = text_distance_query_share

    def compute(
        self,
        episode: Episode,
        support_shallow: Tensor | None = None,
        query_shallow: Tensor | None = None,
    ) -> HeadOutput:
        support, query = episode.support, episode.query
        aux: dict[str, Tensor] = {}
        if self.prompt_generator is None:
            support_r, query_g = self._without_text(support, query)
        else:
            support_r, query_g = self._semantic_prompting(episode, aux)
        d1 = otam_distance(query_g, episode.class_means(support_r))  # [B, Q, N]
        d2 = self.padm(episode, support_r, query_g)  # [B, Q, N]
        logits = -(0.5 * d1 + d2)
        if episode.query_labels is not None and self.hsmr is not None:
            s_shallow, q_shallow = self._shallow_inputs(episode, support_shallow, query_shallow)
            l_hsmr = self.hsmr(self.fusion, support, query, s_shallow, q_shallow)
            aux["motion_consistency"] = self.motion_alpha * l_hsmr
        elif support_shallow is not None or query_shallow is not None:
            self._shallow_inputs(episode, support_shallow, query_shallow)  # still check them
        return HeadOutput(logits, aux)

    def _without_text(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """spm='none': supports and queries pass the fusion transformer on their frames alone."""
        n_support = support.shape[0] * support.shape[1]
        out = self.fusion.transformer(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
        return out[:n_support].view_as(support), out[n_support:].view_as(query)

    def _semantic_prompting(
        self, episode: Episode, aux: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """SPM: `(s_r, ts_r) = SE(s, E[c_s])`, `(q_g, tq_g) = SE(q, p(q))`; consistency terms."""
        support, query = episode.support, episode.query
        episode_token = episode.class_text.mean(1)  # tau: [B, D]
        support_text = episode.support_text()  # E[c_s]: [B, S, D]
        query_prompt = self.prompt_generator(episode_token, query)  # p(q): [B, Q, D]
        frames = [support, query]
        tokens = [support_text, query_prompt]
        with_terms = episode.query_labels is not None and (
            self.consistency_weight or self.text_distance_weight
        )
        if with_terms:  # also SE(s, p(s)) and SE(q, E[c_q])
            support_prompt = self.prompt_generator(episode_token, support)
            query_text = episode.query_text()
            frames += [support, query]
            tokens += [support_prompt, query_text]
        fused, fused_tok = self.fusion(
            torch.cat([x.flatten(0, 1) for x in frames]),
            torch.cat([x.flatten(0, 1) for x in tokens]),
        )
        sizes = [x.shape[0] * x.shape[1] for x in frames]
        fused = [
            f.unflatten(0, x.shape[:2]) for f, x in zip(fused.split(sizes), frames, strict=True)
        ]
        fused_tok = [
            f.unflatten(0, x.shape[:2]) for f, x in zip(fused_tok.split(sizes), frames, strict=True)
        ]
        if with_terms:
            self._consistency_terms(aux, tokens, fused, fused_tok)
        return fused[0], fused[1]

    def _consistency_terms(
        self,
        aux: dict[str, Tensor],
        tokens: list[Tensor],
        fused: list[Tensor],
        fused_tok: list[Tensor],
    ) -> None:
        """The paper's consistency terms between real-text and generated-prompt paths."""
        support_text, query_prompt, support_prompt, query_text = tokens
        s_real, q_gen, s_gen, q_real = fused
        ts_real, tq_gen, ts_gen, tq_real = fused_tok

        def dist(x: Tensor, y: Tensor) -> Tensor:  # mean over videos of the squared distance
            return squared_distance(x.flatten(0, 1), y.flatten(0, 1)).mean()

        def with_token(tok: Tensor, frames: Tensor) -> Tensor:
            return torch.cat([tok[:, :, None], frames], dim=2)  # [B, V, T+1, D]

        if self.consistency_weight:
            share = self.consistency_query_share
            query_term = dist(with_token(tq_real, q_real), with_token(tq_gen, q_gen))
            support_term = dist(with_token(ts_real, s_real), with_token(ts_gen, s_gen))
            aux["consistency"] = self.consistency_weight * (
                share * query_term + (1 - share) * support_term
            )
        if self.text_distance_weight:
            share = self.text_distance_query_share
            query_term = dist(query_text, query_prompt) + dist(tq_real, tq_gen)
            support_term = dist(support_text, support_prompt) + dist(ts_real, ts_gen)
            aux["text_distance"] = self.text_distance_weight * (
                share * query_term + (0.5 - share) * support_term
            )

    def _shallow_inputs(
        self, episode: Episode, support_shallow: Tensor | None, query_shallow: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The shallow level of HSMR: the final embedding, or the checked layer inputs."""
        if self.hsmr_layer is None:
            if support_shallow is not None or query_shallow is not None:
                raise EpisodeError("support_shallow/query_shallow given but hsmr_source is 'final'")
            return episode.support, episode.query
        if support_shallow is None or query_shallow is None:
            raise EpisodeError(
                f"hsmr_source 'layer:{self.hsmr_layer}' needs support_shallow [B,S,T,D_l] and "
                "query_shallow [B,Q,T,D_l] when query_labels are given"
            )
        for name, x, ref in (
            ("support_shallow", support_shallow, episode.support),
            ("query_shallow", query_shallow, episode.query),
        ):
            if x.dim() != 4 or x.shape[:3] != ref.shape[:3]:
                raise EpisodeError(
                    f"{name} must be [B,*,T,D_l] matching {list(ref.shape[:3])}, "
                    f"got {list(x.shape)}"
                )
        return support_shallow, query_shallow


@dataclass
class CLIPSPMConfig(HeadConfig):
    name: str = option("clipspm", "few-shot head")
    heads: int = option(8, "attention heads of the transformer layers")
    dim_head: int = option(256, "width of one attention head")
    mlp_dim: int = option(2048, "hidden width of the feed-forward blocks")
    attn_dropout: float = option(0.2, "attention dropout (training only)")
    ffn_dropout: float = option(0.05, "feed-forward dropout (training only)")
    prompt_hidden: int = option(2048, "hidden width of the SPM prompt generator")
    mid_dim_text: float = option(1.5, "text gate width ratio (release MID_DIM_TEXT)")
    mid_dim_vision: float = option(0.5, "vision gate width ratio (release MID_DIM_VISION)")
    negative_slope: float = option(0.0025, "LeakyReLU slope of the gates")
    alpha: float = option(0.2, "text-video fusion weight (release ALPHA)")
    motion_alpha: float = option(1.0, "HSMR motion-consistency weight inside the head")
    motion_alpha_learnable: bool = option(False, "learn motion_alpha")
    hsmr: bool = option(True, "hierarchical synergistic motion refinement (training term)")
    hsmr_source: str = option("final", "HSMR shallow level: final | layer:<cached layer>")
    spm: Literal["generated", "none"] = option("generated", "semantic prompt module")
    padm: bool = option(True, "prototype-anchored dual modulation")
    consistency_weight: float = option(0.0, "prompt-consistency loss weight")
    text_distance_weight: float = option(0.0, "text-distance loss weight")

    def check(self) -> None:
        try:
            parse_hsmr_source(self.hsmr_source)
        except ValueError as err:
            raise ConfigError(f"head.{err}") from None
        if self.spm == "none" and (self.consistency_weight or self.text_distance_weight):
            raise ConfigError(
                "head.consistency_weight / head.text_distance_weight compare generated prompts: "
                "set head.spm=generated or the weights to 0"
            )


def hsmr_layer(config: CLIPSPMConfig) -> str | None:
    """The cached layer HSMR reads at training time, if any."""
    return parse_hsmr_source(config.hsmr_source) if config.hsmr else None


def build(config: CLIPSPMConfig, context: BuildContext) -> CLIPSPMHead:
    layer = hsmr_layer(config)
    if layer is not None and layer not in context.layer_dims:
        raise ConfigError(
            f"head.hsmr_source={config.hsmr_source!r} but the store caches no layer {layer!r} "
            f"(cached: {sorted(context.layer_dims)}); extract with --layers {layer}"
        )
    return CLIPSPMHead(
        context.feature_dim,
        heads=config.heads,
        dim_head=config.dim_head,
        mlp_dim=config.mlp_dim,
        prompt_hidden=config.prompt_hidden,
        gate_text_ratio=config.mid_dim_text,
        gate_vision_ratio=config.mid_dim_vision,
        negative_slope=config.negative_slope,
        fusion_alpha=config.alpha,
        motion_alpha=config.motion_alpha,
        motion_alpha_learnable=config.motion_alpha_learnable,
        hsmr=config.hsmr,
        hsmr_source=config.hsmr_source if config.hsmr else "final",
        shallow_dim=context.layer_dims[layer] if layer is not None else None,
        spm=config.spm,
        padm=config.padm,
        consistency_weight=config.consistency_weight,
        text_distance_weight=config.text_distance_weight,
        attn_dropout=config.attn_dropout,
        ffn_dropout=config.ffn_dropout,
    )


SPEC = HeadSpec(
    name="clipspm",
    title="CLIP-SPM",
    summary="HSMR motion refinement, SPM prompts, PADM prototypes + OTAM (the CLIP-SPM release)",
    citation="arXiv 2512.19036",
    config=CLIPSPMConfig,
    build=build,
    head_type=CLIPSPMHead,
    # The release adds 0.001 * motion consistency; its consistency terms carry their own weights.
    aux_weights={"motion_consistency": 0.001, "consistency": 1.0, "text_distance": 1.0},
    training_inputs=lambda config: TrainingInputs(layer=hsmr_layer(config)),
    official=OfficialKeys(
        release="CLIP-SPM",
        prefixes=(
            ("context1.", "padm.transformer.", TRANSFORMER_KEYS),
            ("context2.", "fusion.transformer.", TRANSFORMER_KEYS),
            ("gate_text.", "fusion.text_gate.", GATE_KEYS),
            ("gate_vision.", "fusion.vision_gate.", GATE_KEYS),
            ("token_tr.mlp.net.", "prompt_generator.ffn.", (("0.", "fc1."), ("3.", "fc2."))),
            ("motion_conv1.", "hsmr.motion.conv1.", (("", ""),)),
            ("motion_conv2.", "hsmr.motion.conv2.", (("", ""),)),
            ("mo_alpha1", "motion_alpha", (("", ""),)),
        ),
        markers=("context1.", "gate_text.", "gate_vision.", "token_tr.", "motion_conv", "mo_alpha"),
        unused=lambda head: {"scale": torch.ones(1)},
    ),
    tiny={"heads": 4, "dim_head": 16, "mlp_dim": 128, "prompt_hidden": 128},
    demo_lr=5e-5,
    published_key="clip_spm",
    # version 1 wrote dim_head: null for "256"
    from_v1=lambda options: {k: v for k, v in options.items() if k != "dim_head" or v is not None},
)
