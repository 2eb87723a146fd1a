"""Few-shot heads on cached CLIP features: blocks, OTAM, the registered methods.

`fsar.heads.registry.HEADS` is the table of registered heads (one `HeadSpec` each).

Every head is called as
`head(support [B,S,T,D], support_labels [B,S], query [B,Q,T,D], class_text [B,N,D],
query_labels=None, **head_specific) -> HeadOutput(logits [B,Q,N], aux)`.
"""

from .baselines import OTAMHead, ProtoMeanHead
from .blocks import (
    COS_SIM_EPS,
    Attention,
    FeedForward,
    Gate,
    MotionModule,
    TransformerLayer,
    cos_sim,
)
from .clipfsar import CLIPFSARHead
from .clipmei import AdditiveFusion, CLIPMEIHead
from .clipspm import SPM_CHOICES, CLIPSPMHead, parse_hsmr_source
from .clipspm_parts import HSMR, PADM, ClassMeanOTAM, PromptGenerator, TextVideoFusion
from .crosstransformer import CrossTransformerHead
from .hyrsm import HyRSMHead, HyRSMPlusPlusHead
from .otam import OTAM_LAMBDA, frame_distances, otam_bidirectional, otam_distance, otam_one_way
from .output import Episode, EpisodeError, FewShotHead, HeadOutput, episode_loss
from .reference import load_official, official_key_map, to_official
from .registry import HEADS, build_head, head_names, head_spec, spec_of
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, TrainingInputs
from .sten import STENHead
from .trx import TRXHead, TupleCrossTransformer
from .tsn import TSNHead

__all__ = [
    "HEADS",
    "BuildContext",
    "HeadConfig",
    "HeadSpec",
    "OfficialKeys",
    "TrainingInputs",
    "build_head",
    "head_names",
    "head_spec",
    "spec_of",
    "AdditiveFusion",
    "Attention",
    "CLIPFSARHead",
    "CLIPMEIHead",
    "CLIPSPMHead",
    "COS_SIM_EPS",
    "ClassMeanOTAM",
    "CrossTransformerHead",
    "Episode",
    "EpisodeError",
    "FeedForward",
    "FewShotHead",
    "Gate",
    "HSMR",
    "HeadOutput",
    "HyRSMHead",
    "HyRSMPlusPlusHead",
    "MotionModule",
    "OTAMHead",
    "OTAM_LAMBDA",
    "PADM",
    "PromptGenerator",
    "ProtoMeanHead",
    "SPM_CHOICES",
    "STENHead",
    "TextVideoFusion",
    "TransformerLayer",
    "TSNHead",
    "TRXHead",
    "TupleCrossTransformer",
    "cos_sim",
    "episode_loss",
    "frame_distances",
    "load_official",
    "official_key_map",
    "otam_bidirectional",
    "otam_distance",
    "otam_one_way",
    "parse_hsmr_source",
    "to_official",
]
