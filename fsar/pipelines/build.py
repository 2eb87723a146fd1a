"""From a HeadConfig to a head, and from a batch of episode indices to the head's inputs.

Heads are pure tensor code; this module is where config values and store contents meet them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fsar.cache.bank import FeatureBank
from fsar.config import ConfigError, HeadConfig
from fsar.heads import FewShotHead
from fsar.heads.registry import build_head as registry_build
from fsar.heads.registry import head_spec
from fsar.heads.spec import LOGITS_TERM, BuildContext, TrainingInputs
from fsar.pipelines.episodes import EpisodeIndex


def build_head(
    config: HeadConfig,
    feature_dim: int,
    layer_dims: Mapping[str, int],
    num_train_classes: int | None = None,
) -> FewShotHead:
    """A freshly initialised head of the registry (seed torch first for reproducible weights)."""
    return registry_build(config, BuildContext(feature_dim, dict(layer_dims), num_train_classes))


def training_inputs(config: HeadConfig) -> TrainingInputs:
    """What the head reads in training beyond the episode (its spec decides)."""
    return head_spec(config.name).training_inputs(config)


def train_class_count(store) -> int:
    """Classes of a store's training split (the width of per-class layers such as HyRSM's)."""
    rows = store.split_indices("train", done_only=False)
    return int(np.unique(store.class_ids[rows]).size)


def aux_weights(config: HeadConfig, present: set[str]) -> dict[str, float]:
    """Weights of the loss terms: the cross-entropy of the logits ('logits') and the auxiliary
    terms the head returned (config first, then the head's defaults)."""
    defaults = {LOGITS_TERM: 1.0, **head_spec(config.name).aux_weights}
    unknown = set(config.aux_weights) - set(defaults)
    if unknown:
        raise ConfigError(
            f"head.aux_weights: {sorted(unknown)} are not loss terms of {config.name} "
            f"(its terms: {', '.join(sorted(defaults))})"
        )
    weights = {**defaults, **config.aux_weights}
    present = present | {LOGITS_TERM}
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
    text_classes: dataset class ids of the training text table, for heads whose training reads
        class ids (`TrainingInputs.class_ids`; training only).
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
    layer = training_inputs(config).layer
    if training and layer is not None:
        extras["support_shallow"] = frames("support", layer)
        extras["query_shallow"] = frames("query", layer)
    if training and text_classes is not None:
        extras |= class_id_inputs(
            config,
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


def class_id_inputs(
    config: HeadConfig,
    class_text: torch.Tensor,
    text_classes: torch.Tensor,
    support_class_ids: torch.Tensor,
    query_class_ids: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``video_text_inputs`` if the head reads class ids in training, else ``{}``."""
    if not training_inputs(config).class_ids:
        return {}
    return video_text_inputs(class_text, text_classes, support_class_ids, query_class_ids)


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
