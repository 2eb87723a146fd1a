"""D-XH/CLIP-MEI `CNN`: fsar's `clipmei` head with the golden file's small widths.

The release's loss is `sum_q CE(logits) + 0.001 * dists` (TASKS_PER_BATCH = 1): the head's
`episode_loss` with the spec's aux weights and the CE weighted by Q (sum instead of mean).
"""

from __future__ import annotations

import torch.nn.functional as F

from fsar.heads import episode_loss, spec_of

REQUIRED_OUTPUTS = ("output.logits", "output.dists", "output.ce_sum", "output.loss")


def head_options(settings: dict) -> dict:
    return {
        "name": "clipmei",
        "heads": settings["heads"],
        "dim_head": settings["dim_head"],
        "mlp_dim": settings["mlp"],
        "prompt_hidden": settings["tok_hidden"],
    }


def release_outputs(head, episode) -> dict:
    out = head(
        episode.support,
        episode.support_labels,
        episode.query,
        episode.class_text,
        query_labels=episode.query_labels,
    )
    logits, labels = out.logits[0], episode.query_labels[0]
    weights = dict(spec_of(head).aux_weights)
    assert set(weights) == set(out.aux), sorted(out.aux)
    n_queries = labels.shape[0]
    return {
        "output.logits": logits,
        "output.dists": sum(out.aux.values()).reshape(1),  # mo_alpha1 [1] makes it [1]
        "output.ce_sum": F.cross_entropy(logits, labels, reduction="sum"),
        "output.loss": episode_loss(out, episode.query_labels, {"logits": n_queries, **weights}),
    }
