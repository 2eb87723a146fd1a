"""CNN_HyRSM_1shot/_5shot and CNN_HyRSM_plusplus_1shot/_5shot of the CLIP-FSAR codebase.

The 1-shot classes are fsar's heads with `set_members="videos"`, the 5-shot ones with
`"prototypes"`. The class ids go in as the training inputs (`TrainingInputs(class_ids=True)`)
with a zero text table (the heads read only its row count); the release's loss is
`episode_loss` with the spec's default weights (0.6 frame classifier, 0.3 temporal regulariser).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsar.heads import episode_loss, spec_of

REQUIRED_OUTPUTS = (
    "output.logits",
    "output.class_logits",
    "output.ce_episode",
    "output.ce_frame_class",
    "output.loss",
)

# golden file prefix -> (fsar head, set members)
HEADS = {
    "hyrsm1shot": ("hyrsm", "videos"),
    "hyrsm5shot": ("hyrsm", "prototypes"),
    "hyrsmpp1shot": ("hyrsm_pp", "videos"),
    "hyrsmpp5shot": ("hyrsm_pp", "prototypes"),
}


def head_options(settings: dict) -> dict:
    name, members = HEADS[settings["method"]]
    train = settings["cfg"]["TRAIN"]
    options = {"name": name, "set_members": members, "mid_dim": settings["mid_dim"]}
    options["heads"] = settings["heads"]
    options["position_a"] = train.get("POSITION_A", 10.0)
    options["position_b"] = train.get("POSITION_B", 1.0)
    if name == "hyrsm_pp":
        options["window_size"] = train["WINDOW_SIZE"]
        options["temporal_balance"] = train["TEMPORAL_BALANCE"]
        options["balance_coefficient"] = train["BALANCE_COEFFICIENT"]
    weights = {"frame_class": train["USE_CLASSIFICATION_VALUE"]}
    if name == "hyrsm_pp":
        weights["temporal_regular"] = train["TEMPORAL_LOSS_WEIGHT"]
    options["aux_weights"] = weights
    return options


def release_outputs(head, episode) -> dict:
    d = episode.support.shape[-1]
    table = torch.zeros(episode.num_classes, d, dtype=episode.support.dtype)
    out = head(
        episode.support,
        episode.support_labels,
        episode.query,
        episode.class_text,
        query_labels=episode.query_labels,
        support_class_ids=episode.support_class_ids,
        query_class_ids=episode.query_class_ids,
        text_table=table,
    )
    frames = torch.cat([head.encode_frames(episode.support), head.encode_frames(episode.query)], 1)
    class_logits = head.frame_class_logits(frames)[0].flatten(0, 1)  # [(S+Q)*T, C], video-major
    # the training loop's weights: the config's over the spec's defaults
    weights = {**spec_of(head).aux_weights, **head_options(episode.settings)["aux_weights"]}
    outputs = {
        "output.logits": out.logits[0],
        "output.class_logits": class_logits,
        "output.ce_episode": F.cross_entropy(out.logits[0], episode.query_labels[0]),
        "output.ce_frame_class": out.aux["frame_class"],
        "output.loss": episode_loss(out, episode.query_labels, weights),
    }
    if "temporal_regular" in out.aux:
        outputs["output.loss_temporal_regular"] = out.aux["temporal_regular"]
    return outputs
