"""The ``fsar`` command line: parses arguments and dispatches; the work lives in the packages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fsar.config import ConfigError, config_dir, describe, load_config

# flag -> dotted config key, shared by the sub-commands that build a Config
EXTRACT_FLAGS = {
    "dataset": "dataset.name",
    "root": "dataset.root",
    "variant": "dataset.variant",
    "splits_dir": "dataset.splits_dir",
    "model": "model.name",
    "pretrained": "model.pretrained",
    "weights": "model.weights",
    "checkpoint": "model.checkpoint",
    "out": "extract.out",
    "backend": "extract.backend",
    "frames": "extract.frames",
    "views": "extract.views",
    "layers": "extract.layers",
    "workers": "extract.workers",
    "device": "extract.device",
    "batch_frames": "extract.batch_frames",
}


def _config_help() -> str:
    return "\n".join(f"  {key:<24} {default:<18} {text}" for key, default, text in describe())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsar", description="Few-shot action recognition on cached CLIP features."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ext = sub.add_parser(
        "extract",
        help="decode videos, encode frames and class names, write a feature store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set any with key=value):\n" + _config_help(),
    )
    ext.add_argument(
        "--dataset", help="kinetics | ssv2_full | ssv2_small | ucf101 | hmdb51 | folder | demo"
    )
    ext.add_argument("--root", help="local copy of the dataset")
    ext.add_argument("--variant", help="split-list variant (default per benchmark)")
    ext.add_argument("--splits-dir", dest="splits_dir", help="folder with the variant's lists")
    ext.add_argument("--model", help="open_clip model name or fsar-tiny-vit / fsar-tiny-rn")
    weights = ext.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai)")
    weights.add_argument("--weights", help="local CLIP weights file")
    ext.add_argument("--checkpoint", help="official CLIP-SPM/CLIP-FSAR checkpoint (visual encoder)")
    ext.add_argument("--out", help="store path (.zarr directory or .h5 file)")
    ext.add_argument("--backend", choices=["zarr", "hdf5"])
    ext.add_argument("--frames", help="reference_test | uniform:K | all")
    ext.add_argument("--views", help="comma list: center,flip,crop0,...")
    ext.add_argument("--layers", help="comma list of intermediate layers (block3, stage2, ...)")
    ext.add_argument("--workers", type=int, help="decode workers")
    ext.add_argument("--device", help="auto | cpu | cuda")
    ext.add_argument("--batch-frames", dest="batch_frames", type=int, help="frames per forward")
    _add_config_args(ext)

    splits = sub.add_parser("splits", help="fetch and verify the official split lists")
    splits_sub = splits.add_subparsers(dest="splits_command", required=True)
    fetch = splits_sub.add_parser("fetch", help="download a variant's lists and check their sha256")
    fetch.add_argument("name", help="variant (e.g. hmdb_ARN) or benchmark (e.g. hmdb51)")
    fetch.add_argument("--dest", help="target folder (default: the fsar splits cache)")
    fetch.add_argument("--mirror", help="base address or folder to fetch from instead")
    verify = splits_sub.add_parser("verify", help="check a folder of lists against the registry")
    verify.add_argument("directory")
    verify.add_argument("--root", help="local dataset copy: list the split videos missing from it")
    splits_sub.add_parser("list", help="list the registered variants")

    cache = sub.add_parser("cache", help="inspect feature stores")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    info = cache_sub.add_parser("info", help="counts, failures, recipe and fingerprint of a store")
    info.add_argument("store")
    check = cache_sub.add_parser("verify", help="consistency checks of a store's contents")
    check.add_argument("store")

    demo = sub.add_parser("demo", help="render the synthetic dataset and run the pipeline on it")
    demo.add_argument("--workdir", default="outputs/demo")
    demo.add_argument("--model", default="fsar-tiny-vit")

    show = sub.add_parser("config", help="print every config key with its default and meaning")
    _add_config_args(show)
    return parser


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], help="YAML file (repeatable)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def config_from_args(args: argparse.Namespace):
    """dataset + model YAML (when shipped) + --config files + flags + key=value overrides."""
    files = []
    for section, name in (("datasets", args.dataset), ("models", args.model)):
        if name and (config_dir() / section / f"{name}.yaml").is_file():
            files.append(config_dir() / section / f"{name}.yaml")
    files += args.config
    overrides = [
        f"{key}={getattr(args, flag)}"
        for flag, key in EXTRACT_FLAGS.items()
        if getattr(args, flag, None) is not None
    ]
    return load_config(files, overrides + list(args.overrides))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"fsar {args.command}: error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from fsar import commands

    if args.command == "extract":
        return commands.extract(config_from_args(args))
    if args.command == "splits":
        return commands.splits(args.splits_command, args)
    if args.command == "cache":
        return commands.cache(args.cache_command, Path(args.store))
    if args.command == "demo":
        return commands.demo(Path(args.workdir), args.model)
    if args.command == "config":
        config = load_config(args.config, args.overrides)
        return commands.show_config(config)
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
