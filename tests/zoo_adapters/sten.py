"""CLIP-SPM's model_sten (CNN_OTAM_CLIPFSAR): fsar's `sten` head."""

from __future__ import annotations

from fsar.heads import episode_loss

REQUIRED_OUTPUTS = ("output.logits", "output.loss")


def head_options(settings: dict) -> dict:
    return {"name": "sten"}


def release_outputs(head, episode) -> dict:
    # class_text is the text table's row of each episode class, so the table gets gradients.
    out = head(episode.support, episode.support_labels, episode.query, episode.class_text)
    num_queries = episode.query.shape[1]
    # utils.loss sums the CE over the queries; episode_loss takes the mean.
    return {
        "output.logits": out.logits[0],
        "output.loss": num_queries * episode_loss(out, episode.query_labels),
    }
