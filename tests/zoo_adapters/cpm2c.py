"""CLIP-SPM's CLIP_CPMMC_FSAR: fsar's `cpm2c` head, with the json's widths and run params.

The release's loss (its training loop, TASKS_PER_BATCH = 1) is `episode_loss` with the aux
weights lambdas0..2 and 0.001: the head's aux terms are the release's summed cross-entropies
(`output.ce_sum_*`) and `target_consist_distance`.
"""

from __future__ import annotations

import torch

from fsar.heads import Episode, episode_loss

REQUIRED_OUTPUTS = (
    "output.logits",
    "output.logits_local",
    "output.logits_global",
    "output.class_logits",
    "output.target_consist_distance",
    "output.ce_sum_class",
    "output.ce_sum_local",
    "output.ce_sum_global",
    "output.loss",
)


def head_options(settings: dict) -> dict:
    params, model = settings["params"], settings["cfg"]["MODEL"]
    return {
        "name": "cpm2c",
        "heads": settings["heads"],
        "dim_head": settings["dim_head"],
        "mlp_dim": settings["mlp"],
        "mid_dim_text": params["mid_dim_text"],
        "mid_dim_vision": params["mid_dim_vision"],
        "negative_slope": params["negative_slope"],
        "alpha": params["alpha"],
        "motion_residual_ratio": params["motion_residual_ratio"],
        "normal_coff": model["NORMAL_COFF"],
        "motion_coff": model["MOTION_COFF"],
        "local_weight": params["lambdas1"],
        "global_weight": params["lambdas2"],
    }


def loss_weights(settings: dict) -> dict[str, float]:
    """The release's loss as `episode_loss` weights (no CE of the combined logits)."""
    params = settings["params"]
    return {
        "logits": 0.0,
        "classification": params["lambdas0"],
        "local": params["lambdas1"],
        "global": params["lambdas2"],
        "consistency": 0.001,
    }


def release_outputs(head, episode) -> dict:
    inputs = (episode.support, episode.support_labels, episode.query, episode.class_text)
    out = head(
        *inputs,
        query_labels=episode.query_labels,
        support_class_ids=episode.support_class_ids,
        query_class_ids=episode.query_class_ids,
        text_table=episode.class_text_table,
    )
    scores = head.scores(Episode.checked(*inputs, episode.query_labels))
    videos = torch.cat([episode.support, episode.query], dim=1)
    return {
        "output.logits": out.logits[0],
        "output.logits_local": scores.logits_local[0],
        "output.logits_global": scores.logits_global[0],
        "output.class_logits": head.video_text_logits(videos, episode.class_text_table)[0],
        "output.target_consist_distance": out.aux["consistency"],
        "output.ce_sum_class": out.aux["classification"],
        "output.ce_sum_local": out.aux["local"],
        "output.ce_sum_global": out.aux["global"],
        "output.loss": episode_loss(out, episode.query_labels, loss_weights(episode.settings)),
    }
