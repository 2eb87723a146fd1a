"""The ``fsar`` command line: parses arguments and dispatches; the work lives in the packages."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from fsar.config import ConfigError, config_dir, describe, load_config
from fsar.errors import FsarError
from fsar.failures import (
    close_progress_bars,
    describe_error,
    error_line,
    stdout_closed,
    stdout_reader_gone,
)
from fsar.heads.registry import head_names
from fsar.interrupts import RERUN_HINT, Interrupted

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


TRAIN_FLAGS = {
    "dataset": "dataset.name",
    "model": "model.name",
    "store": "train.store",
    "out": "train.out",
    "head": "head.name",
    "way": "episodes.way",
    "shot": "episodes.shot",
    "steps": "train.steps",
    "device": "train.device",
}
EVAL_FLAGS = {
    "dataset": "dataset.name",
    "model": "model.name",
    "store": "eval.store",
    "checkpoint": "eval.checkpoint",
    "official": "eval.official",
    "head": "head.name",
    "split": "eval.split",
    "episodes": "eval.episodes",
    "way": "episodes.way",
    "shot": "episodes.shot",
    "out": "eval.out",
    "device": "eval.device",
    "decode": "eval.decode",
    "root": "dataset.root",
}
FINETUNE_FLAGS = {
    "dataset": "dataset.name",
    "root": "dataset.root",
    "variant": "dataset.variant",
    "model": "model.name",
    "pretrained": "model.pretrained",
    "weights": "model.weights",
    "checkpoint": "model.checkpoint",
    "out": "train.out",
    "head": "head.name",
    "way": "episodes.way",
    "shot": "episodes.shot",
    "steps": "train.steps",
    "device": "train.device",
}
ABLATE_FLAGS = {
    "dataset": "dataset.name",
    "model": "model.name",
    "store": "train.store",
    "out": "ablate.out",
    "head": "head.name",
    "way": "episodes.way",
    "shot": "episodes.shot",
    "steps": "train.steps",
    "device": "train.device",
    "jobs": "ablate.jobs",
    "shard": "ablate.shard",
    "seeds": "ablate.seeds",
    "threads": "ablate.threads",
}
# flag -> key of a sweep file (fsar sweep)
SWEEP_FLAGS = ("out", "jobs", "shard", "seeds", "threads")
FRAMES_FLAGS = {
    "dataset": "dataset.name",
    "root": "dataset.root",
    "variant": "dataset.variant",
    "splits_dir": "dataset.splits_dir",
    "model": "model.name",
    "frames": "extract.frames",
    "views": "extract.views",
}
COMMAND_FLAGS = {
    "extract": EXTRACT_FLAGS,
    "frames": FRAMES_FLAGS,
    "train": TRAIN_FLAGS,
    "eval": EVAL_FLAGS,
    "finetune": FINETUNE_FLAGS,
    "ablate": ABLATE_FLAGS,
}


def _config_help() -> str:
    return "\n".join(f"  {key:<24} {default:<18} {text}" for key, default, text in describe())


def _add_config_command(sub, name: str, help: str, config_help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with every config key (`config_help`, built once)."""
    return sub.add_parser(
        name,
        help=help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set any with key=value):\n" + config_help,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsar", description="Few-shot action recognition on cached CLIP features."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = _config_help()

    ext = _add_config_command(
        sub,
        "extract",
        "decode videos, encode frames and class names, write a feature store",
        config_help,
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
    ext.add_argument("--frames", help="reference_test | uniform:K | all | dense[:CAP]")
    ext.add_argument("--views", help="comma list: center,flip,crop0,...")
    ext.add_argument("--layers", help="comma list of intermediate layers (block3, stage2, ...)")
    ext.add_argument("--workers", type=int, help="decode workers")
    ext.add_argument("--device", help="auto | cpu | cuda")
    ext.add_argument("--batch-frames", dest="batch_frames", type=int, help="frames per forward")
    _add_config_args(ext)

    frames = _add_config_command(
        sub,
        "frames",
        "write what the encoder sees for chosen videos (indices, pixels .npz, PNG sheet)",
        config_help,
    )
    frames.add_argument(
        "--dataset", help="kinetics | ssv2_full | ssv2_small | ucf101 | hmdb51 | folder | demo"
    )
    frames.add_argument("--root", help="local copy of the dataset")
    frames.add_argument("--variant", help="split-list variant (default per benchmark)")
    frames.add_argument("--splits-dir", dest="splits_dir", help="folder with the variant's lists")
    frames.add_argument("--model", help="sets the input size only (no weights are read)")
    frames.add_argument("--frames", help="reference_test | uniform:K | all")
    frames.add_argument("--views", help="comma list: center,flip,crop0,...")
    frames.add_argument("--videos", required=True, help="comma list of video ids")
    frames.add_argument("--out", required=True, help="the .npz to write")
    frames.add_argument("--sheet", help="the PNG contact sheet (default: --out with .png)")
    frames.add_argument("--seed", type=int, default=0, help="seed of a stochastic frame rule")
    frames.add_argument(
        "--draw", type=int, metavar="K", help="K seeded draws per video (stochastic rules)"
    )
    _add_config_args(frames)

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

    train = _add_config_command(
        sub, "train", "train a few-shot head episodically on a feature store", config_help
    )
    _add_experiment_args(train)
    train.add_argument("--store", help="feature store (from fsar extract)")
    train.add_argument("--out", help="run directory (checkpoints, metrics, TensorBoard)")
    train.add_argument("--steps", type=int, help="optimizer steps")
    _add_config_args(train)

    ev = _add_config_command(
        sub,
        "eval",
        "score a head on fixed episodes: accuracy, 95%% interval, confusion",
        config_help,
    )
    _add_experiment_args(ev)
    ev.add_argument("--store", help="feature store (default: the checkpoint's training store)")
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="best.pt / last.pt of fsar train")
    source.add_argument("--official", help="official CLIP-SPM / CLIP-FSAR checkpoint")
    source.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="two checkpoints: paired difference A - B"
    )
    ev.add_argument("--split", choices=["train", "val", "test"])
    ev.add_argument("--episodes", type=int, help="evaluation episodes (default 10000)")
    ev.add_argument("--out", help="result JSON (default: beside the checkpoint)")
    ev.add_argument(
        "--decode",
        action="store_const",
        const="true",
        help="finetune checkpoints: decode the videos under --root instead of reading a store",
    )
    ev.add_argument("--root", help="local copy of the dataset (with --decode)")
    _add_config_args(ev)

    ft = _add_config_command(
        sub,
        "finetune",
        "train the CLIP visual encoder and a head end to end on decoded videos (torchrun: DDP)",
        config_help,
    )
    _add_experiment_args(ft)
    ft.add_argument("--root", help="local copy of the dataset (videos or JPEG frame folders)")
    ft.add_argument("--variant", help="split-list variant (default per benchmark)")
    ft_weights = ft.add_mutually_exclusive_group()
    ft_weights.add_argument("--pretrained", help="open_clip pretrained tag (e.g. openai)")
    ft_weights.add_argument("--weights", help="local CLIP weights file")
    ft.add_argument(
        "--checkpoint", help="official CLIP-SPM/CLIP-FSAR checkpoint: initial visual encoder"
    )
    ft.add_argument("--out", help="run directory (checkpoints, metrics, TensorBoard)")
    ft.add_argument("--steps", type=int, help="optimizer steps")
    _add_config_args(ft)

    ablate = _add_config_command(
        sub, "ablate", "train and evaluate a grid of head settings", config_help
    )
    _add_experiment_args(ablate)
    ablate.add_argument("--store", help="feature store (from fsar extract)")
    ablate.add_argument("--out", help="ablation directory")
    ablate.add_argument("--steps", type=int, help="optimizer steps per grid point")
    ablate.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one grid axis (repeatable), e.g. --grid head.hsmr=true,false",
    )
    _add_runs_args(ablate, "runs (grid point x seed)")
    ablate.add_argument(
        "--collect",
        metavar="DIR",
        help="build the table of an ablation folder from its shards' results (nothing runs)",
    )
    _add_config_args(ablate)

    sweep = sub.add_parser(
        "sweep",
        help="train and evaluate datasets x backbones x methods x shots (x seeds): one report "
        "in the papers' layout",
    )
    sweep.add_argument("--out", help="sweep folder (default: the file's out)")
    _add_runs_args(sweep, "runs")
    sweep.add_argument(
        "--collect",
        metavar="DIR",
        help="build results/ and the report of a sweep folder from its shards' runs",
    )
    sweep.add_argument(
        "items",
        nargs="*",
        metavar="SWEEP.yaml [key=value ...]",
        help="the sweep file (e.g. configs/sweeps/paper_tables.yaml), then settings of it",
    )

    report = sub.add_parser("report", help="tables in the papers' layout and plots from results")
    report.add_argument("paths", nargs="+", help="result JSON files or folders holding them")
    report.add_argument("--out", required=True, help="report folder")
    report.add_argument("--runs", nargs="*", default=[], help="run folders for learning curves")
    report.add_argument(
        "--published",
        help="YAML of published accuracies (like the reference paper_results.yaml): extra rows",
    )

    demo = sub.add_parser("demo", help="render the synthetic dataset and run the whole pipeline")
    demo.add_argument("--workdir", default="outputs/demo")
    demo.add_argument("--model", default="fsar-tiny-vit")
    demo.add_argument("--steps", type=int, default=None, help="training steps per head")

    sub.add_parser("heads", help="list the registered few-shot heads with their options")

    show = sub.add_parser("config", help="print every config key with its default and meaning")
    _add_config_args(show)
    return parser


def _add_experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="compose configs/datasets/NAME.yaml")
    parser.add_argument("--model", help="compose configs/models/NAME.yaml")
    parser.add_argument(
        "--head", choices=head_names(), help="few-shot head (fsar heads lists them)"
    )
    parser.add_argument("--way", type=int, help="classes per episode")
    parser.add_argument("--shot", type=int, help="support videos per class (K)")
    parser.add_argument("--device", help="auto | cpu | cuda")


def _add_runs_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--jobs", type=int, help=f"{what} trained at a time (processes)")
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help=f"run share I of N of the {what} (e.g. $SLURM_ARRAY_TASK_ID/4)",
    )
    parser.add_argument("--seeds", type=int, help="training seeds per run (train.seed, +1, ...)")
    parser.add_argument("--threads", type=int, help="CPU threads of each run (default 1)")


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
    flags = COMMAND_FLAGS[args.command]
    overrides = [
        f"{key}={getattr(args, flag)}"
        for flag, key in flags.items()
        if getattr(args, flag, None) is not None
    ]
    if getattr(args, "grid", None):
        overrides += [_grid_override(item) for item in args.grid]
    return load_config(files, overrides + list(args.overrides))


def _grid_override(item: str) -> str:
    """``head.hsmr=true,false`` -> ``ablate.grid.head.hsmr=[true,false]``."""
    if "=" not in item:
        raise ConfigError(f"--grid {item!r} must look like KEY=V1,V2 (e.g. head.padm=true,false)")
    key, values = item.split("=", 1)
    return f"ablate.grid.{key.strip()}=[{values}]"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected failures (a user's mistake or the environment: ``FsarError``,
    ``OSError``, YAML syntax) print one line ``fsar <cmd>: error: ...`` and exit 2; anything else
    is a bug and keeps its traceback. ``FSAR_DEBUG=1`` prints the traceback of everything."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "sweep" and all("=" in e and e[0] != "-" for e in extra):
        args.items += extra  # settings of the sweep file given after the flags
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = os.environ.get("FSAR_DEBUG", "") not in ("", "0")
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError as err:
        if stdout_reader_gone():
            return stdout_closed()
        error_line(f"fsar {args.command}: error: {describe_error(err)}", debug)
        return 2
    except Interrupted as err:  # a guarded loop stopped at a safe point
        error_line(str(err), debug)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a guarded loop
        error_line(RERUN_HINT, debug)
        return 130
    except (FsarError, OSError, yaml.YAMLError) as err:
        error_line(f"fsar {args.command}: error: {describe_error(err)}", debug)
        return 2
    except Exception:  # a bug: its traceback, starting on a line of its own
        close_progress_bars()
        raise


def _dispatch(args: argparse.Namespace) -> int:
    from fsar import commands

    if args.command == "extract":
        return commands.extract(config_from_args(args))
    if args.command == "frames":
        return commands.frames(
            config_from_args(args),
            [v.strip() for v in args.videos.split(",") if v.strip()],
            Path(args.out),
            Path(args.sheet) if args.sheet else None,
            args.seed,
            args.draw,
        )
    if args.command == "splits":
        return commands.splits(args.splits_command, args)
    if args.command == "cache":
        return commands.cache(args.cache_command, Path(args.store))
    if args.command == "train":
        return commands.train(config_from_args(args))
    if args.command == "eval":
        return commands.evaluate(config_from_args(args), args.compare, args.head)
    if args.command == "finetune":
        return commands.finetune(config_from_args(args))
    if args.command == "ablate":
        if args.collect:
            return commands.ablate_collect(Path(args.collect))
        return commands.ablate(config_from_args(args))
    if args.command == "sweep":
        if args.collect:
            return commands.sweep_collect(Path(args.collect))
        files = [item for item in args.items if "=" not in item]
        if len(files) != 1:
            raise ConfigError("fsar sweep needs one sweep file (or --collect DIR)")
        settings = [item for item in args.items if "=" in item]
        flags = [f"{f}={getattr(args, f)}" for f in SWEEP_FLAGS if getattr(args, f) is not None]
        return commands.sweep(files[0], settings + flags)
    if args.command == "report":
        return commands.report(
            [Path(p) for p in args.paths], Path(args.out), args.runs, args.published
        )
    if args.command == "demo":
        return commands.demo(Path(args.workdir), args.model, args.steps)
    if args.command == "heads":
        return commands.list_heads()
    if args.command == "config":
        config = load_config(args.config, args.overrides)
        return commands.show_config(config)
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
