"""CNN_CrossTransformer of the CLIP-FSAR codebase: fsar's `crosstransformer` head."""

from __future__ import annotations

from fsar.heads import episode_loss

REQUIRED_OUTPUTS = ("output.logits", "output.loss")
# The release's query head is its key head: state dicts hold the tensor under both names.
OFFICIAL_ALIASES = {"query_head.weight": "key_head.weight"}


def head_options(settings: dict) -> dict:
    # The release divides by 8 whatever T is, so the default divisor stands for the T=7 file too.
    return {"name": "crosstransformer", "hidden": int(settings["hidden_dim"])}


def release_outputs(head, episode) -> dict:
    out = head(episode.support, episode.support_labels, episode.query, episode.class_text)
    return {"output.logits": out.logits[0], "output.loss": episode_loss(out, episode.query_labels)}
