"""CNN_TRX of the CLIP-FSAR codebase: fsar's `trx` head with the json's cardinalities and width.

The per-cardinality logits come from the head's public `cardinality_logits`; the loss is the
release's mean cross-entropy of `output.logits`.
"""

from __future__ import annotations

import torch.nn.functional as F

from fsar.heads import Episode

REQUIRED_OUTPUTS = ("output.logits", "output.loss")  # + logits_card<k> of each k (test_zoo_trx)


def head_options(settings: dict) -> dict:
    # The release's position table has int(1.5*T) rows, fsar's default (max_len unset).
    assert settings["pe_max_len"] == int(1.5 * settings["T"])
    return {
        "name": "trx",
        "temporal_set": list(settings["temp_set"]),
        "out_dim": settings["trans_linear_out_dim"],
        "position_scale": settings["pe_scale_factor"],
        "dropout": settings["trans_dropout"],
    }


def release_outputs(head, episode) -> dict:
    inputs = (episode.support, episode.support_labels, episode.query, episode.class_text)
    logits = head(*inputs).logits[0]
    outputs = {
        "output.logits": logits,
        "output.loss": F.cross_entropy(logits, episode.query_labels[0]),
    }
    for k, card_logits in head.cardinality_logits(Episode.checked(*inputs)).items():
        outputs[f"output.logits_card{k}"] = card_logits[0]
    return outputs
