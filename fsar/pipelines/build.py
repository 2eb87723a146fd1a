"""From a HeadConfig to a head, and from a batch of episode indices to the head's inputs.

Heads are pure tensor code; this module is where config values and store contents meet them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fsar.cache.bank import FeatureBank
from fsar.config import ConfigError, HeadConfig
from fsar.heads import CLIPFSARHead, CLIPSPMHead, FewShotHead, OTAMHead, ProtoMeanHead
from fsar.pipelines.episodes import EpisodeIndex

# The loss weight of each auxiliary term when head.aux_weights leaves it out. CLIP-SPM: the
# release adds 0.001 * motion consistency; its consistency terms carry their own weights.
DEFAULT_AUX_WEIGHTS = {
    "clipspm": {"motion_consistency": 0.001, "consistency": 1.0, "text_distance": 1.0},
    "clipfsar": {"video_text": 1.0},
}


def hsmr_layer(config: HeadConfig) -> str | None:
    """The cached layer CLIP-SPM's HSMR reads, if any."""
    if config.name == "clipspm" and config.hsmr and config.hsmr_source.startswith("layer:"):
        return config.hsmr_source.split(":", 1)[1]
    return None


def build_head(config: HeadConfig, feature_dim: int, layer_dims: Mapping[str, int]) -> FewShotHead:
    """A freshly initialised head (seed torch before calling for reproducible weights)."""
    if config.name == "proto_mean":
        return ProtoMeanHead(scale=config.proto_scale)
    if config.name == "otam":
        return OTAMHead(bidirectional=config.bidirectional)
    if config.name == "clipfsar":
        return CLIPFSARHead(
            feature_dim,
            heads=config.heads,
            dim_head=config.dim_head,
            mlp_dim=config.mlp_dim,
            merge_before=config.merge_before,
            attn_dropout=config.attn_dropout,
            ffn_dropout=config.ffn_dropout,
            fusion_beta=config.fusion_beta,
        )
    layer = hsmr_layer(config)
    if layer is not None and layer not in layer_dims:
        raise ConfigError(
            f"head.hsmr_source={config.hsmr_source!r} but the store caches no layer {layer!r} "
            f"(cached: {sorted(layer_dims)}); extract with --layers {layer}"
        )
    return CLIPSPMHead(
        feature_dim,
        heads=config.heads,
        dim_head=config.dim_head or 256,
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
        shallow_dim=layer_dims[layer] if layer is not None else None,
        spm=config.spm,
        padm=config.padm,
        consistency_weight=config.consistency_weight,
        text_distance_weight=config.text_distance_weight,
        attn_dropout=config.attn_dropout,
        ffn_dropout=config.ffn_dropout,
    )


def aux_weights(config: HeadConfig, present: set[str]) -> dict[str, float]:
    """Weights of the auxiliary terms the head returned (config first, then the defaults)."""
    defaults = DEFAULT_AUX_WEIGHTS.get(config.name, {})
    unknown = set(config.aux_weights) - set(defaults)
    if unknown:
        raise ConfigError(
            f"head.aux_weights: {sorted(unknown)} are not auxiliary terms of {config.name} "
            f"(its terms: {sorted(defaults) or 'none'})"
        )
    weights = {**defaults, **config.aux_weights}
    return {name: weights[name] for name in present if weights.get(name, 0.0) != 0.0}


@dataclass
class EpisodeTensors:
    """What a head is called with (see fsar.heads): shapes in the comments."""

    support: torch.Tensor  # [B, S, T, D]
    support_labels: torch.Tensor  # [B, S]
    query: torch.Tensor  # [B, Q, T, D]
    query_labels: torch.Tensor  # [B, Q]
    class_text: torch.Tensor  # [B, N, D]
    extras: dict[str, torch.Tensor]  # head-specific inputs (shallow layers, class ids)


def episode_tensors(
    bank: FeatureBank,
    episodes: EpisodeIndex,
    positions: torch.Tensor,
    views: torch.Tensor | None,
    config: HeadConfig,
    training: bool,
    text_classes: torch.Tensor | None = None,
) -> EpisodeTensors:
    """Gather the features of B episodes.

    positions: long [V_bank, T] frame positions of every bank video (the caller's policy), or
        a pair (support long [B, S, T], query long [B, Q, T]) of per-occurrence positions;
    views: long [V_bank] index into ``bank.views`` per video, or None for the first view.
    text_classes: dataset class ids forming CLIP-FSAR's video-text table (training only).
    """
    device = bank.device
    episodes = episodes.to(device)

    if isinstance(positions, tuple):  # drawn per occurrence: [B, S, T], [B, Q, T]
        where = {"support": positions[0], "query": positions[1]}
    else:
        where = {"support": positions[episodes.support], "query": positions[episodes.query]}

    def frames(part: str, layer: str | None = None) -> torch.Tensor:
        rows, pos = getattr(episodes, part), where[part].to(device)
        if views is None or len(bank.views) == 1:
            view = bank.views[0]
            if layer is None:
                return bank.gather(rows, pos, view)
            return bank.gather_layer(layer, rows, pos, view)
        out = None
        for v, view in enumerate(bank.views):  # few views: one masked gather each
            chunk = (
                bank.gather(rows, pos, view)
                if layer is None
                else bank.gather_layer(layer, rows, pos, view)
            )
            mask = (views[rows] == v)[..., None, None]
            out = torch.where(mask, chunk, out) if out is not None else chunk * mask
        return out

    extras: dict[str, torch.Tensor] = {}
    layer = hsmr_layer(config)
    if training and layer is not None:
        extras["support_shallow"] = frames("support", layer)
        extras["query_shallow"] = frames("query", layer)
    if training and config.name == "clipfsar" and text_classes is not None:
        extras |= video_text_inputs(
            bank.class_text,
            text_classes,
            bank.class_ids[episodes.support],
            bank.class_ids[episodes.query],
        )
    return EpisodeTensors(
        support=frames("support"),
        support_labels=episodes.support_labels,
        query=frames("query"),
        query_labels=episodes.query_labels,
        class_text=bank.class_text[episodes.classes],
        extras=extras,
    )


def video_text_inputs(
    class_text: torch.Tensor,
    text_classes: torch.Tensor,
    support_class_ids: torch.Tensor,
    query_class_ids: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """CLIP-FSAR's training inputs: the text table of the training classes and, per video, its
    row in that table. class_text [C, D]; text_classes long [C_train] dataset ids; the class ids
    are dataset ids of the episode's videos ([B, S], [B, Q])."""
    device = class_text.device
    lookup = torch.full((len(class_text),), -1, dtype=torch.long, device=device)
    lookup[text_classes.to(device)] = torch.arange(len(text_classes), device=device)
    return {
        "support_class_ids": lookup[support_class_ids.to(device)],
        "query_class_ids": lookup[query_class_ids.to(device)],
        "text_table": class_text[text_classes.to(device)],
    }
