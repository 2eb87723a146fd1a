"""TSN baseline as the CLIP-FSAR codebase's CNN_TSN: mean cosine to the class's supports."""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import cos_sim
from .output import Episode, FewShotHead, HeadOutput
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, option

__all__ = ["TSNHead", "TSNConfig", "SPEC"]


class TSNHead(FewShotHead):
    """Temporal mean of every video; logit of class n = mean over its supports of the cosine.

    `cos_sim` is the releases' `x.y / (|x||y| + 0.01)`; no temperature. Unlike `proto_mean`
    (cosine to the mean prototype) this averages the cosines to each support video, as CNN_TSN
    does. No parameters. Any number of supports per class (the release: its episode's shots).
    The release's `norm_sq_dist` branch is hard-wired off, so it is left out.
    """

    def compute(self, episode: Episode) -> HeadOutput:
        sims = cos_sim(episode.query.mean(2), episode.support.mean(2))  # [B, Q, S]
        return HeadOutput(episode.class_means(sims.transpose(1, 2)).transpose(1, 2))


@dataclass
class TSNConfig(HeadConfig):
    name: str = option("tsn", "few-shot head")


def build(config: TSNConfig, context: BuildContext) -> TSNHead:
    return TSNHead()


SPEC = HeadSpec(
    name="tsn",
    title="TSN",
    summary="mean cosine between frame-mean query and each support (CNN_TSN, no parameters)",
    citation="Wang et al., ECCV 2016",
    config=TSNConfig,
    build=build,
    demo_lr=1e-4,
    head_type=TSNHead,
    official=OfficialKeys(release="CLIP-FSAR codebase (CNN_TSN)", wrapper_prefix="head."),
)
