"""CNN_TSN of the CLIP-FSAR codebase: fsar's `tsn` head (no options)."""

from __future__ import annotations

from fsar.heads import episode_loss

REQUIRED_OUTPUTS = ("output.logits", "output.loss")


def head_options(settings: dict) -> dict:
    assert not settings.get("norm_sq_dist", False), "only the release's cosine branch exists"
    return {"name": "tsn"}


def release_outputs(head, episode) -> dict:
    out = head(episode.support, episode.support_labels, episode.query, episode.class_text)
    return {"output.logits": out.logits[0], "output.loss": episode_loss(out, episode.query_labels)}
