"""Typed configuration: YAML files composed as dataset + model + experiment, dotted overrides.

Every section is a dataclass; each field carries a one-line ``help`` used by ``fsar config``
and the README. Loading rejects unknown keys (with a suggestion), wrong types and impossible
values before any work starts, always naming the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help}, **kwargs)


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
    frames: str = _f("reference_test", "frame policy: reference_test | uniform:K | all")
    seq_len: int = _f(8, "frames per video for reference_test (the releases' SEQ_LEN)")
    t_cap: int = _f(64, "cached frame slots per video for the 'all' policy")
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
        True, "CLIP mean/std normalisation (the CLIP-SPM release feeds [0,1] frames: false)"
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


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)


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
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: top level must be a mapping of sections, got {type(data).__name__}"
            )
        _deep_merge(merged, data)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(merged, key, value)
    config = build_dataclass(Config, merged, prefix="")
    validate(config)
    return config


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} must look like key.sub=value (e.g. extract.views=[center,flip])"
        )
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _deep_merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
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


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
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
    unknown = [s for s in config.dataset.splits if s not in ("train", "val", "test")]
    if unknown:
        raise ConfigError(f"dataset.splits: unknown split(s) {unknown}; valid: train, val, test")
    sources = [k for k in ("pretrained", "weights") if getattr(config.model, k)]
    if len(sources) > 1:
        raise ConfigError("model.pretrained and model.weights are exclusive: pass one of them")


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field: the CLI help and README are built from it."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
