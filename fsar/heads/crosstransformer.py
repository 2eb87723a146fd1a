"""CrossTransformer (Doersch et al.) as the CLIP-FSAR codebase's CNN_CrossTransformer."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from fsar.errors import ConfigError

from .output import Episode, FewShotHead, HeadOutput
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, option

__all__ = ["CrossTransformerHead", "CrossTransformerConfig", "SPEC"]

# CNN_CrossTransformer divides the summed per-frame cosines by 8 whatever the frame count.
RELEASE_LOGIT_DIVISOR = 8.0


class CrossTransformerHead(FewShotHead):
    """Query-aligned class prototypes from attention over the class's support frames.

    Keys and values are bias-free 1x1 convolutions D -> hidden of every frame (`key_head`,
    `value_head`, stored in the release's Conv1d shape [hidden, D, 1]); the query head is the key
    head. For each query and class, every query frame attends, with one softmax over all frames of
    all the class's supports (scale hidden^-0.5), to their values; the result is a prototype
    [T, hidden] aligned to that query. logit = sum over frames of the exact cosine (F.normalize,
    not the releases' +0.01 form) between prototype frame and query value frame, divided by
    `logit_divisor` (8 in the release, independent of T).

    The release regroups supports class by class and needs exactly WAY*SHOT of them; here each
    class's softmax runs over its own frames through a mask, so any number of supports per class
    works. The order of those frames does not matter (a softmax-weighted sum over a set), so
    fsar's support-major layout gives the release's logits (tests/test_zoo_small_heads.py).
    Release state dicts repeat the key head under `query_head.weight`: ignored on load, written
    by `to_official`.
    """

    def __init__(self, dim: int, hidden: int = 1024, logit_divisor: float = RELEASE_LOGIT_DIVISOR):
        super().__init__()
        self.key_head = nn.Conv1d(dim, hidden, 1, bias=False)
        self.value_head = nn.Conv1d(dim, hidden, 1, bias=False)
        self.scale = hidden**-0.5
        self.logit_divisor = logit_divisor

    def compute(self, episode: Episode) -> HeadOutput:
        support, query = episode.support, episode.query
        b, s, t, _ = support.shape
        hidden = self.key_head.weight.shape[0]
        support_keys = _project(self.key_head, support).reshape(b, 1, s * t, hidden)
        support_values = _project(self.value_head, support).reshape(b, 1, 1, s * t, hidden)
        query_keys = _project(self.key_head, query)  # [B, Q, T, H]
        query_values = _project(self.value_head, query)  # [B, Q, T, H]

        scores = query_keys @ support_keys.transpose(-1, -2) * self.scale  # [B, Q, T, S*T]
        # frame j = support j // T: is it in class n?  [B, N, S*T]
        in_class = (episode.class_weights > 0).repeat_interleave(t, dim=-1)
        scores = scores[:, :, None].masked_fill(~in_class[:, None, :, None], float("-inf"))
        attention = scores.softmax(-1)  # [B, Q, N, T, S*T]
        prototypes = attention @ support_values  # [B, Q, N, T, H]

        cosines = F.normalize(prototypes, dim=-1) * F.normalize(query_values, dim=-1)[:, :, None]
        return HeadOutput(cosines.sum((-1, -2)) / self.logit_divisor)  # [B, Q, N]


def _project(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A 1x1 Conv1d over frames, as a linear map of the last dim: [..., D] -> [..., H]."""
    return F.linear(x, conv.weight.squeeze(-1))


@dataclass
class CrossTransformerConfig(HeadConfig):
    name: str = option("crosstransformer", "few-shot head")
    hidden: int = option(1024, "key/value width (release 1024, with a 2048-d ResNet-50 input)")
    logit_divisor: float = option(
        RELEASE_LOGIT_DIVISOR, "the summed per-frame cosines are divided by this (release 8)"
    )

    def check(self) -> None:
        if self.hidden < 1:
            raise ConfigError(f"head.hidden must be >= 1, got {self.hidden}")
        if self.logit_divisor <= 0:
            raise ConfigError(f"head.logit_divisor must be > 0, got {self.logit_divisor}")


def build(config: CrossTransformerConfig, context: BuildContext) -> CrossTransformerHead:
    return CrossTransformerHead(context.feature_dim, config.hidden, config.logit_divisor)


def _query_head(head: CrossTransformerHead) -> dict[str, Tensor]:
    # The release's `query_head` is the key head module itself, saved under both names.
    return {"query_head.weight": head.key_head.weight.detach()}


SPEC = HeadSpec(
    name="crosstransformer",
    title="CrossTransformer",
    summary="query-aligned prototypes by attention over the class's support frames "
    "(CNN_CrossTransformer)",
    citation="Doersch et al., NeurIPS 2020",
    tiny={"hidden": 32},
    config=CrossTransformerConfig,
    build=build,
    head_type=CrossTransformerHead,
    official=OfficialKeys(
        release="CLIP-FSAR codebase (CNN_CrossTransformer)",
        markers=("key_head.", "query_head.", "value_head."),
        unused=_query_head,
        wrapper_prefix="head.",
    ),
)
