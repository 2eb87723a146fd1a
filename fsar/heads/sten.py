"""STEN as CLIP-SPM's models/model_sten.py (CNN_OTAM_CLIPFSAR): text and visual softmaxes."""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import cos_sim
from .output import Episode, FewShotHead, HeadOutput
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, option

__all__ = ["STENHead", "STENConfig", "SPEC"]


class STENHead(FewShotHead):
    """logits[q, n] = softmax_n(cos_sim(q_mean, text_n)) * softmax_n(cos_sim(q_mean, s_mean_n)).

    q_mean: the query's temporal mean; s_mean_n: the mean over class n's supports of their
    temporal means; text_n = `class_text[n]`; `cos_sim` is the releases' +0.01 form. The product of
    two probability vectors is used as logits (the release's loss is a cross-entropy of it). No
    parameters.

    Release quirks and how fsar handles them:
    - the release's loss sums the cross-entropy over the queries; `episode_loss` takes the mean,
      i.e. the release's loss divided by Q (a constant factor that Adam ignores);
    - it reshapes the frames with a hard-coded 8 (another T mixes videos or fails): any T here;
    - its width is tied to the backbone (RN50 1024, ViT-B/16 512): any D here;
    - it reads the test classes' text table at eval and the train table in training, indexed by
      the supports' dataset classes: `class_text` is always the text of the episode's classes,
      which is the same thing.
    """

    def compute(self, episode: Episode) -> HeadOutput:
        query = episode.query.mean(2)  # [B, Q, D]
        prototypes = episode.class_means(episode.support.mean(2))  # [B, N, D]
        text = cos_sim(query, episode.class_text).softmax(-1)  # [B, Q, N]
        visual = cos_sim(query, prototypes).softmax(-1)  # [B, Q, N]
        return HeadOutput(text * visual)


@dataclass
class STENConfig(HeadConfig):
    name: str = option("sten", "few-shot head")


def build(config: STENConfig, context: BuildContext) -> STENHead:
    return STENHead()


SPEC = HeadSpec(
    name="sten",
    title="STEN",
    summary="product of query-text and query-prototype softmaxes (CLIP-SPM's model_sten, "
    "no parameters)",
    citation="CLIP-SPM release, models/model_sten.py",
    config=STENConfig,
    build=build,
    head_type=STENHead,
    official=OfficialKeys(release="CLIP-SPM (model_sten)"),
)
