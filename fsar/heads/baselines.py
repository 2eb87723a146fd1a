"""Parameter-free baselines: frame-mean prototypes and OTAM."""

from __future__ import annotations

from dataclasses import dataclass

from fsar.errors import ConfigError

from .blocks import cos_sim
from .otam import frame_distances, otam_bidirectional, otam_distance, otam_one_way
from .output import Episode, FewShotHead, HeadOutput
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, option

__all__ = ["ProtoMeanHead", "OTAMHead", "ProtoMeanConfig", "OTAMConfig", "PROTO_MEAN", "OTAM"]

# Soft-min temperature of the CLIP-FSAR codebase's CNN_OTAM (`OTAM_cum_dist`).
RELEASE_OTAM_LAMBDA = 0.1


class ProtoMeanHead(FewShotHead):
    """Cosine similarity between a query's frame mean and its class prototypes.

    Prototype n = mean over the supports of class n of their frame means. `scale` multiplies
    the cosine (a fixed temperature; 1 keeps raw cosine values).
    """

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def compute(self, episode: Episode) -> HeadOutput:
        prototypes = episode.class_means(episode.support.mean(2))  # [B, N, D]
        logits = cos_sim(episode.query.mean(2), prototypes) * self.scale  # [B, Q, N]
        return HeadOutput(logits)


class OTAMHead(FewShotHead):
    """`-OTAM` on `1 - cos_sim` frame distances.

    prototype=False (the CLIP-FSAR codebase's CNN_OTAM): the distance to class n is the mean over
    its supports of the OTAM distance to each support video. prototype=True: one OTAM distance to
    the class-mean frames (fsar's heads before the zoo). `lam` is the soft-min temperature (0.1
    in CNN_OTAM). The release computes the soft-min without a max-shift, which underflows to +inf
    in float32 once every term exceeds about 10*lam; fsar's log-sum-exp is stable and equal to it
    wherever the release is finite (tests/test_otam.py).
    """

    def __init__(
        self, bidirectional: bool = True, lam: float = RELEASE_OTAM_LAMBDA, prototype: bool = False
    ):
        super().__init__()
        self.bidirectional = bidirectional
        self.lam = lam
        self.prototype = prototype

    def compute(self, episode: Episode) -> HeadOutput:
        if self.prototype:
            prototypes = episode.class_means(episode.support)  # [B, N, T, D]
            return HeadOutput(
                -otam_distance(episode.query, prototypes, self.bidirectional, self.lam)
            )
        dists = frame_distances(episode.query, episode.support)  # [B, Q, S, T, T]
        align = otam_bidirectional if self.bidirectional else otam_one_way
        per_support = align(dists, self.lam)  # [B, Q, S]
        return HeadOutput(-episode.class_means(per_support.transpose(1, 2)).transpose(1, 2))


@dataclass
class ProtoMeanConfig(HeadConfig):
    name: str = option("proto_mean", "few-shot head")
    proto_scale: float = option(1.0, "temperature multiplying the cosine")


@dataclass
class OTAMConfig(HeadConfig):
    name: str = option("otam", "few-shot head")
    bidirectional: bool = option(True, "bidirectional OTAM")
    lam: float = option(RELEASE_OTAM_LAMBDA, "soft-min temperature (CNN_OTAM 0.1, CLIP-SPM 0.5)")
    prototype: bool = option(
        False, "align to class-mean frames (true) or average the per-support distances (release)"
    )

    def check(self) -> None:
        if self.lam <= 0:
            raise ConfigError(f"head.lam must be > 0, got {self.lam}")


PROTO_MEAN = HeadSpec(
    name="proto_mean",
    title="Frame-mean prototypes",
    summary="cosine between frame-mean query and class prototype (no parameters)",
    config=ProtoMeanConfig,
    build=lambda config, context: ProtoMeanHead(scale=config.proto_scale),
    head_type=ProtoMeanHead,
    demo_lr=1e-4,
)


def _build_otam(config: OTAMConfig, context: BuildContext) -> OTAMHead:
    return OTAMHead(config.bidirectional, config.lam, config.prototype)


OTAM = HeadSpec(
    name="otam",
    title="OTAM",
    summary="ordered temporal alignment, as the CLIP-FSAR codebase's CNN_OTAM (no parameters)",
    citation="Cao et al., CVPR 2020",
    config=OTAMConfig,
    build=_build_otam,
    head_type=OTAMHead,
    official=OfficialKeys(release="CLIP-FSAR codebase (CNN_OTAM)", wrapper_prefix="head."),
    demo_lr=1e-4,
    # before the zoo, otam aligned to class-mean frames with the soft-min temperature 0.5
    from_v1=lambda options: {**options, "lam": 0.5, "prototype": True},
)
