"""What a head declares once: its name, typed options, constructor, losses, inputs, official keys.

Every head module ends with one `HeadSpec`; `fsar.heads.registry.HEADS` is the explicit table of
them. Everything outside `fsar/heads/` (config validation, build, training, evaluation, the CLI,
the demo, reports) asks the spec instead of testing head names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .output import FewShotHead

__all__ = [
    "BuildContext",
    "HeadConfig",
    "HeadSpec",
    "OfficialKeys",
    "TrainingInputs",
    "option",
    "LOGITS_TERM",
]

# Loss-weight key of the cross-entropy of `HeadOutput.logits` (1 unless a head's release loss
# leaves it out, e.g. CPM2C trains on its local and global logits separately).
LOGITS_TERM = "logits"


def option(default: Any, help: str) -> Any:
    """A dataclass field with a one-line help (shown by `fsar config` and the README)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class HeadConfig:
    """Options shared by every head; each head's own options live in a subclass.

    A key of another head is an error naming the head (see `fsar.config`), so an ablation grid
    never varies a key the chosen head ignores.
    """

    name: str = option("clipspm", "few-shot head (fsar heads list shows the choices)")
    aux_weights: dict[str, float] = option(
        {},
        "loss weight per auxiliary term, over the head's defaults ('logits' weighs the "
        "cross-entropy of the logits)",
    )

    def check(self) -> None:
        """Raise ConfigError for values the types cannot rule out (override per head)."""

    def own_fields(self) -> list[str]:
        """Names of the options this head adds to name and aux_weights."""
        shared = {f.name for f in dataclasses.fields(HeadConfig)}
        return [f.name for f in dataclasses.fields(self) if f.name not in shared]


@dataclass(frozen=True)
class BuildContext:
    """What the store tells a head's constructor."""

    feature_dim: int  # D of the cached frame features
    layer_dims: Mapping[str, int] = field(default_factory=dict)  # cached layer -> width
    num_train_classes: int | None = None  # classes of the training split (frame classifiers)


@dataclass(frozen=True)
class TrainingInputs:
    """Tensors a head reads at training time beyond the episode (passed as keyword inputs).

    layer: cached intermediate layer -> `support_shallow [B,S,T,D_l]`, `query_shallow [B,Q,T,D_l]`.
    class_ids: `support_class_ids [B,S]`, `query_class_ids [B,Q]` (rows of `text_table`, i.e.
        indices among the training classes) and `text_table [C_train, D]`.
    """

    layer: str | None = None
    class_ids: bool = False


# (official prefix, fsar prefix, ((official inner prefix, fsar inner prefix), ...))
PrefixRule = tuple[str, str, tuple[tuple[str, str], ...]]
SAME_NAMES: tuple[PrefixRule, ...] = (("", "", (("", ""),)),)


@dataclass(frozen=True)
class OfficialKeys:
    """How a release names the head's parameters (see `fsar.heads.reference`).

    prefixes: official -> fsar key rewriting, first match wins (`SAME_NAMES`: identical keys).
    markers: key prefixes only this release head has, to name the right `--head` on a mismatch.
    unused: official entries the outputs never use, `head -> {key: initial value}`; accepted and
        skipped on load, written back by `to_official` so the release loads it strictly.
    derived: regular expressions (whole key) of official entries the head recomputes instead of
        storing (e.g. TRX's frame-index tuples and position table, which depend on T): accepted
        and skipped on load, not written by `to_official`.
    wrapper_prefix: prefix of the head's keys inside the release's whole-model checkpoint
        (`head.` for the alibaba framework's `model_state`).
    """

    release: str
    prefixes: tuple[PrefixRule, ...] = SAME_NAMES
    markers: tuple[str, ...] = ()
    unused: Callable[[nn.Module], dict[str, Tensor]] | None = None
    derived: tuple[str, ...] = ()
    wrapper_prefix: str = ""


def _no_inputs(config: HeadConfig) -> TrainingInputs:
    return TrainingInputs()


@dataclass(frozen=True)
class HeadSpec:
    """One registered head.

    config: the head's `HeadConfig` subclass (its name default is `name`).
    build: `(config, context) -> head`; seed torch first for reproducible weights.
    head_type: the module class `build` returns (how `load_official` finds the spec).
    aux_weights: default loss weight of each auxiliary term the head returns (release values).
    training_inputs: `config -> TrainingInputs`.
    """

    name: str
    title: str  # how reports and papers name the method, e.g. "TRX"
    summary: str  # one line for `fsar heads` and the README
    config: type[HeadConfig]
    build: Callable[[Any, BuildContext], FewShotHead]
    head_type: type[FewShotHead]
    aux_weights: Mapping[str, float] = field(default_factory=dict)
    training_inputs: Callable[[Any], TrainingInputs] = _no_inputs
    official: OfficialKeys | None = None
    citation: str = ""  # paper, venue and year
    # Options sized for the 64-d tiny test models (tests, demo, benchmarks); the defaults are
    # the releases' widths.
    tiny: Mapping[str, Any] = field(default_factory=dict)
    # Learning rate in the demo report (None: the head is not part of the demo).
    demo_lr: float | None = None
    # Config version 1 (one flat head section) -> this head's options, with the same numbers.
    from_v1: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # Key of the method in the published results (../shared/reference/paper_results.yaml).
    published_key: str | None = None
