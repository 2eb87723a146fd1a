"""The table of registered heads: one `HeadSpec` per method, listed explicitly.

To add a head, write its module (the head, its `HeadConfig` subclass and its `SPEC`) and add the
spec to `_SPECS`. Nothing registers itself on import.
"""

from __future__ import annotations

from torch import nn

from fsar.errors import ConfigError

from . import baselines, clipfsar, clipmei, clipspm, cpm2c, crosstransformer, hyrsm, sten, trx, tsn
from .output import FewShotHead
from .spec import BuildContext, HeadConfig, HeadSpec

__all__ = ["HEADS", "head_names", "head_spec", "head_config", "spec_of", "build_head"]

# Baselines first, then the methods in publication order, CLIP-SPM last; the demo report and
# `fsar heads` follow this order (the first demo head is the paired-difference baseline).
_SPECS: tuple[HeadSpec, ...] = (
    baselines.PROTO_MEAN,
    tsn.SPEC,
    baselines.OTAM,
    crosstransformer.SPEC,
    trx.SPEC,
    hyrsm.SPEC,
    hyrsm.SPEC_PP,
    sten.SPEC,
    clipfsar.SPEC,
    cpm2c.SPEC,
    clipmei.SPEC,
    clipspm.SPEC,
)
HEADS: dict[str, HeadSpec] = {spec.name: spec for spec in _SPECS}


def head_names() -> list[str]:
    return list(HEADS)


def head_spec(name: str) -> HeadSpec:
    """The spec of a registered head; an unknown name is a ConfigError listing the choices."""
    spec = HEADS.get(name)
    if spec is None:
        raise ConfigError(f"head.name: unknown head {name!r}; registered heads: {', '.join(HEADS)}")
    return spec


def spec_of(head: nn.Module) -> HeadSpec | None:
    """The spec whose head class `head` is (None for a module no spec builds)."""
    for spec in HEADS.values():
        if type(head) is spec.head_type:
            return spec
    return None


def head_config(name: str, **options) -> HeadConfig:
    """The typed options of head `name` (defaults, then `options`)."""
    return head_spec(name).config(**options)


def build_head(config: HeadConfig, context: BuildContext) -> FewShotHead:
    """A freshly initialised head (seed torch before calling for reproducible weights)."""
    return head_spec(config.name).build(config, context)
