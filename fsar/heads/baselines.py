"""Parameter-free baselines: frame-mean prototypes and plain OTAM."""

from __future__ import annotations

from .blocks import cos_sim
from .otam import otam_distance
from .output import Episode, FewShotHead, HeadOutput

__all__ = ["ProtoMeanHead", "OTAMHead"]


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
    """`-OTAM` between raw query frames and class-mean prototype frames (bidirectional default)."""

    def __init__(self, bidirectional: bool = True):
        super().__init__()
        self.bidirectional = bidirectional

    def compute(self, episode: Episode) -> HeadOutput:
        prototypes = episode.class_means(episode.support)  # [B, N, T, D]
        return HeadOutput(-otam_distance(episode.query, prototypes, self.bidirectional))
