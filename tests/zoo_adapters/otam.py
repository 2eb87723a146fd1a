"""CNN_OTAM of the CLIP-FSAR codebase: fsar's `otam` head with its defaults."""

from __future__ import annotations

import torch.nn.functional as F

REQUIRED_OUTPUTS = ("output.logits", "output.loss")


def head_options(settings: dict) -> dict:
    return {"name": "otam"}  # the defaults are the release's (lambda 0.1, mean over supports)


def release_outputs(head, episode) -> dict:
    out = head(episode.support, episode.support_labels, episode.query, episode.class_text)
    logits = out.logits[0]
    return {
        "output.logits": logits,
        "output.loss": F.cross_entropy(logits, episode.query_labels[0]),
    }
