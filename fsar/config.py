"""Typed configuration: YAML files composed as dataset + model + experiment, dotted overrides.

Every section is a dataclass; each field carries a one-line ``help`` used by ``fsar config``
and the README. Loading rejects unknown keys (with a suggestion), wrong types and impossible
values before any work starts, always naming the offending key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fsar.errors import ConfigError
from fsar.heads.registry import HEADS, head_spec
from fsar.heads.spec import HeadConfig, option

# ConfigError lives in fsar.errors (heads raise it too); callers import it from here.


_f = option  # a field with its one-line help


@dataclass
class DatasetConfig:
    name: str = _f(
        "demo", "benchmark (kinetics, ssv2_full, ssv2_small, ucf101, hmdb51), 'folder' or 'demo'"
    )
    root: str | None = _f(None, "local copy of the dataset: video files or JPEG frame folders")
    variant: str | None = _f(
        None, "split-list variant (e.g. kinetics_CMN, clipfsar_kinetics100); default per benchmark"
    )
    splits_dir: str | None = _f(
        None,
        "folder holding the variant's split lists (default: where `fsar splits fetch` puts them)",
    )
    splits: list[str] = _f(["train", "val", "test"], "splits to include in the store")


@dataclass
class ModelConfig:
    name: str = _f(
        "fsar-tiny-vit",
        "open_clip model name (RN50, ViT-B-16, ...) or fsar-tiny-vit / fsar-tiny-rn",
    )
    pretrained: str | None = _f(
        None, "open_clip pretrained tag (e.g. openai); downloaded by open_clip on first use"
    )
    weights: str | None = _f(
        None, "local weights file (.pt/.bin/.safetensors state dict of the whole CLIP model)"
    )
    checkpoint: str | None = _f(
        None,
        "official CLIP-SPM / CLIP-FSAR (or fsar finetune) checkpoint: its backbone.* weights replace the visual encoder",
    )
    random_init: bool = _f(
        False,
        "allow random weights for a real architecture (benchmarks only: numbers are meaningless)",
    )
    quick_gelu: bool | None = _f(
        None,
        "QuickGELU activations; default: on for OpenAI weights (tag openai or an official checkpoint)",
    )


@dataclass
class ExtractConfig:
    out: str | None = _f(
        None, "feature store to write (a .zarr directory, or a .h5 file with backend hdf5)"
    )
    backend: Literal["zarr", "hdf5"] = _f("zarr", "store backend")
    frames: str = _f(
        "reference_test",
        "frame policy: reference_test | uniform:K | all | dense[:CAP] (every source frame, for "
        "the release frame rules)",
    )
    seq_len: int = _f(8, "frames per video for reference_test (the releases' SEQ_LEN)")
    t_cap: int = _f(64, "cached frame slots per video for the 'all' and 'dense' policies")
    min_frames: int | None = _f(
        None,
        "videos with fewer frames are recorded as failed (default: seq_len for reference_test, else 1)",
    )
    views: list[str] = _f(
        ["center"], "cached views: center, flip, crop0..cropK (seeded random crops)"
    )
    layers: list[str] = _f(
        [], "intermediate layers to cache (e.g. block3 for ViT, stage2 for ResNet)"
    )
    resize: int | None = _f(
        None, "shorter-side resize (default: crop * 256 / 224, the releases' 256 -> 224)"
    )
    crop: int | None = _f(None, "center-crop size (default: the model's image size)")
    normalize: bool = _f(
        True, "mean/std normalisation (the CLIP-SPM release feeds [0,1] frames: false)"
    )
    mean: list[float] | None = _f(
        None, "per-channel normalisation mean (null = CLIP's; CLIP-FSAR UCF101 5-shot: 0.45 x3)"
    )
    std: list[float] | None = _f(
        None, "per-channel normalisation std (null = CLIP's; CLIP-FSAR UCF101 5-shot: 0.225 x3)"
    )
    resize_mode: Literal["short_side", "squash"] = _f(
        "short_side",
        "short_side: shorter side to `resize`, long side truncated, no-op when already there; "
        "squash: both sides to `resize` (CLIP-FSAR release)",
    )
    interpolation: Literal["bicubic", "bilinear", "nearest", "pil_bilinear", "bilinear_float"] = _f(
        "bicubic",
        "resize filter: bicubic/bilinear/nearest (torchvision, antialiased), pil_bilinear (Pillow, "
        "CLIP-SPM release), bilinear_float (torch on floats, no antialias: CLIP-FSAR release)",
    )
    crop_offset: Literal["round_half_even", "floor"] = _f(
        "round_half_even",
        "centre-crop offset: round((W-crop)/2) half-to-even (CLIP-SPM) or (W-crop)//2 (CLIP-FSAR)",
    )
    frame_listing: Literal["natural_images", "sorted_all"] = _f(
        "natural_images",
        "frame-folder order: JPEGs in natural order, or every entry as plain strings (the releases)",
    )
    precision: Literal["fp32", "fp16", "bf16"] = _f(
        "fp16", "encoder precision on GPU: fp32 (the releases) or fp16/bf16 autocast; CPU runs fp32"
    )
    feature_dtype: Literal["float16", "float32"] = _f(
        "float16", "dtype of the stored features and layers (the releases keep float32)"
    )
    prompts: str = _f(
        "clipspm16",
        "text prompts: clipspm16 (16-template ensemble), single ('a photo of {}'), or a template containing {}",
    )
    batch_frames: int = _f(256, "frames per encoder forward pass")
    workers: int = _f(2, "DataLoader decode workers (0 = decode in the main process)")
    decode_backend: Literal["auto", "decord", "pyav"] = _f(
        "auto", "video decoder; auto = decord with PyAV fallback"
    )
    chunk_videos: int = _f(
        16, "videos per store chunk (the unit of resumable, rank-disjoint writes)"
    )
    seed: int = _f(0, "seed of the random-crop views")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    retry_failed: bool = _f(False, "re-attempt videos recorded as failed in an existing store")


# Version of the config record written into checkpoints and run records. 1 (no field): the
# flat head section of 25 keys shared by all heads; 2: each head's own typed options.
CONFIG_VERSION = 2


@dataclass
class ProtocolConfig:
    """The choices of SPEC 6.1 that move numbers; recorded with every checkpoint and report."""

    preset: str = _f("fsar", "name recorded in reports: fsar | clipspm_release | clipfsar_release")
    selection_split: Literal["val", "test"] = _f(
        "val", "split used to pick the best checkpoint (the releases select on test)"
    )
    test_frames: Literal[
        "cached",
        "segment_random",
        "clipspm_test",
        "clipfsar_test",
        "clipfsar_segment",
        "clipfsar_k100_test",
    ] = _f(
        "cached",
        "evaluation frames: cached (the store's deterministic test frames), segment_random (one "
        "seeded cached frame per segment), or a release rule over the source video, redrawn per "
        "episode (needs a dense store): clipspm_test, clipfsar_test (Kinetics-100 centred clip "
        "on kinetics, else clipfsar_segment), clipfsar_segment, clipfsar_k100_test",
    )
    train_frames: Literal[
        "cached", "clipspm_train", "clipfsar_train", "clipfsar_segment", "clipfsar_k100_train"
    ] = _f(
        "cached",
        "training frames: cached (the releases' jitter over the cached frames, SPEC 3) or a "
        "release rule over the source video (needs a dense store): clipspm_train, "
        "clipfsar_train (clipfsar_k100_train on kinetics, else clipfsar_segment), ...",
    )
    train_shot: int | None = _f(
        None, "training shot for a K-shot test (null = K; CLIP-FSAR trains 1-shot for 5-shot)"
    )
    train_query: int = _f(4, "training queries per class (CLIP-SPM 4, CLIP-FSAR 5)")
    train_views: list[str] = _f(
        ["center"],
        "cached views sampled at train time (add flip / cropK if cached; no flip on SSv2)",
    )


@dataclass
class EpisodeConfig:
    way: int = _f(5, "classes per episode (N)")
    shot: int = _f(1, "support videos per class at test time (K)")
    query: int = _f(1, "query videos per class at test time (the releases use 1)")


@dataclass
class TrainConfig:
    store: str | None = _f(None, "feature store to train on (from fsar extract)")
    out: str | None = _f(None, "run directory: checkpoints, metrics.jsonl, TensorBoard logs")
    steps: int = _f(2000, "optimizer steps")
    tasks_per_batch: int = _f(16, "episodes per optimizer step (gradient accumulation)")
    episode_batch: int = _f(16, "episodes per forward pass (divides tasks_per_batch)")
    lr: float = _f(1e-4, "Adam learning rate")
    weight_decay: float = _f(5e-5, "Adam weight decay")
    betas: list[float] = _f([0.5, 0.999], "Adam betas (the releases use 0.5, 0.999)")
    val_every: int = _f(200, "steps between validations (and checkpoints)")
    val_episodes: int = _f(500, "episodes per validation")
    log_every: int = _f(10, "steps between metric lines")
    seed: int = _f(6, "seed of episodes, frame jitter and initialisation (release seed 6)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    bf16: bool = _f(True, "bf16 autocast on GPU (ignored on CPU)")
    resume: bool = _f(True, "continue from out/last.pt when it exists")
    compile: bool = _f(
        False,
        "run the head's training and validation steps under torch.compile (inductor: needs a "
        "C++ compiler on CPU; compiles once per run, then faster steps; same numbers to float "
        "rounding)",
    )


@dataclass
class EvalConfig:
    store: str | None = _f(None, "feature store to evaluate on (default: train.store)")
    split: Literal["train", "val", "test"] = _f("test", "split to draw evaluation episodes from")
    episodes: int = _f(10000, "evaluation episodes")
    episode_batch: int = _f(100, "episodes per forward pass")
    seed: int = _f(0, "seed of the fixed evaluation episode list")
    checkpoint: str | None = _f(None, "fsar checkpoint (best.pt / last.pt of a train run)")
    official: str | None = _f(
        None, "official CLIP-SPM / CLIP-FSAR checkpoint: its head weights via load_official"
    )
    out: str | None = _f(None, "result JSON to write (default: beside the checkpoint)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    decode: bool = _f(
        False,
        "score an fsar finetune checkpoint on videos decoded from dataset.root, every episode "
        "through its encoder (the releases' way), instead of on a store",
    )


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (``fsar finetune``); the loop itself reads ``train.*``."""

    backbone_lr: float | None = _f(
        None,
        "learning rate of the visual encoder (null = train.lr: one Adam over every parameter, "
        "as the releases)",
    )
    grad_checkpointing: bool = _f(
        False, "recompute encoder activations in the backward pass (less memory, more compute)"
    )
    freeze_blocks: int = _f(
        0, "freeze the stem and the first k encoder blocks (ViT blocks, ResNet stages)"
    )
    episode_batch: int = _f(
        1, "episodes per forward pass through the encoder (memory grows with it)"
    )
    workers: int = _f(2, "DataLoader decode workers per process")
    prefetch: int = _f(2, "episodes each decode worker prepares ahead")
    flip: bool | None = _f(
        None, "random horizontal flip of training clips (null: on, except on SSv2)"
    )
    validation: Literal["cached", "decoded"] = _f(
        "cached",
        "cached: encode each validation video once into an in-memory bank, then score the "
        "episodes (a store's numbers); decoded: decode and encode every episode (the releases)",
    )


@dataclass
class RunsConfig:
    """How a set of training runs is scheduled (``fsar ablate``, ``fsar sweep``)."""

    seeds: int = _f(
        1,
        "training seeds per run (train.seed, train.seed+1, ...): tables give the mean over seeds, "
        "its spread, and differences paired over seeds x episodes",
    )
    jobs: int = _f(1, "runs trained at a time, each in its own process (joblib's loky backend)")
    threads: int = _f(
        1,
        "CPU threads of each run (torch.set_num_threads), whatever jobs is: CPU numbers are "
        "bitwise repeatable for one thread count, another count rounds sums differently",
    )
    shard: str | None = _f(
        None,
        "I/N: run only share I of N of the runs (0 <= I < N), e.g. one scheduler array task "
        "each; then --collect the folder",
    )
    devices: list[str] = _f(
        [],
        "devices the running jobs take in turn (job slot k: devices[k % len]); empty: every GPU "
        "when train.device is auto and there are several, else train.device",
    )


@dataclass
class AblateConfig(RunsConfig):
    grid: dict[str, list[Any]] = _f(
        {}, "dotted key -> values, e.g. {head.hsmr: [true, false], head.padm: [true, false]}"
    )
    out: str | None = _f(None, "ablation directory: one run per grid point, table.md, table.csv")


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    head: HeadConfig = field(default_factory=lambda: head_spec(HeadConfig.name).config())
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)


def config_dir() -> Path:
    """Where the shipped YAML configs live (``$FSAR_CONFIG_DIR`` overrides)."""
    env = os.environ.get("FSAR_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Merge YAML files in order, then ``key.sub=value`` overrides, into a validated Config."""
    merged: dict[str, Any] = {}
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: top level must be a mapping of sections, got {type(data).__name__}"
            )
        _deep_merge(merged, data)
    for item in overrides:
        key, value = parse_override(item)
        _switch_head(merged, key, value)
        _set_dotted(merged, key, value)
    config = build_dataclass(Config, merged, prefix="")
    validate(config)
    return config


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """A validated copy of ``config`` with dotted keys set (e.g. {"head.hsmr": False})."""
    data = to_dict(config)
    for key, value in overrides.items():
        _switch_head(data, key, value)
        _set_dotted(data, key, value)
    new = build_dataclass(Config, data, prefix="")
    validate(new)
    return new


def _switch_head(tree: dict, key: str, value: Any) -> None:
    """Setting head.name to another head starts from that head's defaults: the head options
    set before belong to the previous head (later head.* overrides apply to the new one)."""
    if key != "head.name":
        return
    head = tree.get("head") or {}
    if isinstance(head, dict) and head.get("name", HeadConfig.name) != value:
        tree["head"] = {}


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} must look like key.sub=value (e.g. extract.views=[center,flip])"
        )
    key, raw = item.split("=", 1)
    if not raw.strip():
        return key.strip(), None
    return key.strip(), parse_yaml(raw, f"override {item!r}", column_offset=len(key) + 1)


def parse_yaml(text: str, where: str, column_offset: int = 0) -> Any:
    """``yaml.safe_load`` whose syntax errors become one ConfigError naming ``where``, the line
    and the column (1-based, as editors count; ``column_offset`` shifts the first line's, e.g.
    past ``key=`` in an override)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        at = ""
        if mark is not None:
            column = mark.column + 1 + (column_offset if mark.line == 0 else 0)
            at = f" at line {mark.line + 1}, column {column}"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        detail = f"{context}, {problem}" if context else problem
        raise ConfigError(f"{where}: YAML syntax error{at}: {detail}") from err


def _deep_merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if key.startswith("ablate.grid."):  # grid keys are themselves dotted config keys
        parts = ["ablate", "grid", key[len("ablate.grid.") :]]
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys and wrong types by dotted name."""
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown key '{prefix}{key}'{hint}; valid keys in {where}: {', '.join(names)}"
            )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
    return cls(**kwargs)


def build_head_config(data: Any, prefix: str = "head.") -> HeadConfig:
    """The chosen head's typed options; a key of another head is refused, naming both heads."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping, got {data!r}")
    name = data.get("name", HeadConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"{prefix}name: expected a head name, got {name!r}")
    spec = head_spec(name)
    own = [f.name for f in dataclasses.fields(spec.config)]
    for key in data:
        if key in own:
            continue
        owners = [
            other.name
            for other in HEADS.values()
            if key in {f.name for f in dataclasses.fields(other.config)}
        ]
        if owners:
            raise ConfigError(
                f"{prefix}{key} is an option of {', '.join(owners)}, not of head {name}; "
                f"drop it or pick that head ({name}'s options: {', '.join(own)})"
            )
    return build_dataclass(spec.config, data, prefix)


def config_from_record(record: dict[str, Any]) -> Config:
    """The Config saved in a checkpoint or run record, of any CONFIG_VERSION."""
    data = upgrade_config_dict(record["config"], int(record.get("config_version", 1)))
    return build_dataclass(Config, data, prefix="")


def upgrade_config_dict(data: dict[str, Any], version: int) -> dict[str, Any]:
    """A config dict of an older CONFIG_VERSION, as the current version reads it (same numbers).

    Version 1 kept every head's keys in one flat section; the head used only its own, so the
    others are dropped, and the head's spec maps what changed meaning (`HeadSpec.from_v1`).
    """
    if version >= CONFIG_VERSION:
        return data
    data = dict(data)
    head = dict(data.get("head") or {})
    name = head.get("name", HeadConfig.name)
    spec = HEADS.get(name)
    if spec is not None:
        own = {f.name for f in dataclasses.fields(spec.config)}
        head = {key: value for key, value in head.items() if key in own}
        if spec.from_v1 is not None:
            head = spec.from_v1(head)
    data["head"] = head
    return data


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is HeadConfig:
        return build_head_config(value, key + ".")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, str):  # `views=center,flip` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def validate(config: Config) -> None:
    """Value checks that types alone cannot express."""
    ex = config.extract
    for key, value in (
        ("extract.seq_len", ex.seq_len),
        ("extract.t_cap", ex.t_cap),
        ("extract.batch_frames", ex.batch_frames),
        ("extract.chunk_videos", ex.chunk_videos),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if ex.workers < 0:
        raise ConfigError(f"extract.workers must be >= 0, got {ex.workers}")
    for key, value in (("extract.resize", ex.resize), ("extract.crop", ex.crop)):
        if value is not None and value < 8:
            raise ConfigError(f"{key} must be >= 8 pixels, got {value}")
    if ex.resize is not None and ex.crop is not None and ex.resize < ex.crop:
        raise ConfigError(f"extract.resize ({ex.resize}) must be >= extract.crop ({ex.crop})")
    for key, values in (("extract.mean", ex.mean), ("extract.std", ex.std)):
        if values is not None and len(values) != 3:
            raise ConfigError(f"{key} needs 3 values (R, G, B), got {values}")
    if ex.std is not None and min(ex.std) <= 0:
        raise ConfigError(f"extract.std values must be > 0, got {ex.std}")
    unknown = [s for s in config.dataset.splits if s not in ("train", "val", "test")]
    if unknown:
        raise ConfigError(f"dataset.splits: unknown split(s) {unknown}; valid: train, val, test")
    validate_experiment(config)
    sources = [k for k in ("pretrained", "weights") if getattr(config.model, k)]
    if len(sources) > 1:
        raise ConfigError("model.pretrained and model.weights are exclusive: pass one of them")


def validate_experiment(config: Config) -> None:
    """Checks of the head, episode and training sections that need no store."""
    ep, tr, pr = config.episodes, config.train, config.protocol
    for key, value in (
        ("episodes.way", ep.way),
        ("episodes.shot", ep.shot),
        ("episodes.query", ep.query),
        ("protocol.train_query", pr.train_query),
        ("train.steps", tr.steps),
        ("train.tasks_per_batch", tr.tasks_per_batch),
        ("train.episode_batch", tr.episode_batch),
        ("train.val_every", tr.val_every),
        ("train.val_episodes", tr.val_episodes),
        ("train.log_every", tr.log_every),
        ("eval.episodes", config.eval.episodes),
        ("eval.episode_batch", config.eval.episode_batch),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    ft = config.finetune
    for key, value in (
        ("finetune.episode_batch", ft.episode_batch),
        ("finetune.prefetch", ft.prefetch),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in (
        ("finetune.freeze_blocks", ft.freeze_blocks),
        ("finetune.workers", ft.workers),
    ):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if ft.backbone_lr is not None and ft.backbone_lr < 0:
        raise ConfigError(f"finetune.backbone_lr must be >= 0 or null, got {ft.backbone_lr}")
    if ep.way < 2:
        raise ConfigError(
            f"episodes.way must be >= 2 (a 1-way episode has nothing to tell apart), got {ep.way}"
        )
    if pr.train_shot is not None and pr.train_shot < 1:
        raise ConfigError(f"protocol.train_shot must be >= 1 or null, got {pr.train_shot}")
    if len(tr.betas) != 2 or not all(0 <= b < 1 for b in tr.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {tr.betas}")
    if tr.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {tr.lr}")
    if not pr.train_views:
        raise ConfigError("protocol.train_views must name at least one cached view (e.g. center)")
    config.head.check()
    check_runs(config.ablate, "ablate.")
    for key in config.ablate.grid:
        if key.split(".")[0] not in ("head", "protocol", "train"):
            raise ConfigError(
                f"ablate.grid key {key!r}: only head.*, protocol.* and train.* can vary "
                "(the store and the evaluation episodes stay fixed)"
            )


def check_runs(runs: RunsConfig, prefix: str) -> None:
    """Value checks of a RunsConfig (the ``ablate`` section, a sweep file)."""
    for key in ("seeds", "jobs", "threads"):
        if getattr(runs, key) < 1:
            raise ConfigError(f"{prefix}{key} must be >= 1, got {getattr(runs, key)}")
    parse_shard(runs.shard, f"{prefix}shard")


def parse_shard(text: str | None, key: str = "shard") -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; None -> (0, 1), the whole set."""
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or int(match[1]) >= int(match[2]):
        raise ConfigError(
            f"{key} must look like I/N with 0 <= I < N (e.g. 0/4, the first of 4 shares), "
            f"got {text!r}"
        )
    return int(match[1]), int(match[2])


def check_head_batching(config: Config) -> None:
    """train-heads runs tasks_per_batch episodes as micro-batches of train.episode_batch
    (fsar finetune uses finetune.episode_batch instead, checked per process count)."""
    tr = config.train
    if tr.tasks_per_batch % tr.episode_batch:
        raise ConfigError(
            f"train.tasks_per_batch ({tr.tasks_per_batch}) must be a multiple of "
            f"train.episode_batch ({tr.episode_batch})"
        )


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field: the CLI help and README are built from it."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if hint is HeadConfig:
            rows += describe(HeadConfig, f"{prefix}{f.name}.")
            for spec in HEADS.values():
                own = [r for r in describe(spec.config, f"{prefix}{f.name}.")]
                shared = {f"{prefix}{f.name}.{g.name}" for g in dataclasses.fields(HeadConfig)}
                rows += [(k, d, f"[{spec.name}] {h}") for k, d, h in own if k not in shared]
            continue
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
