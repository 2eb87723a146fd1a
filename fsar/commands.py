"""What each sub-command does, in terms of the packages; printing is the only thing added here."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fsar.config import Config, load_config, to_dict


def extract(config: Config) -> int:
    from fsar.extract.runner import run_extraction

    result = run_extraction(config)
    if result.rank != 0:  # under torchrun only rank 0 reports
        return 0
    print(format_extract_result(result))
    return 0


def format_extract_result(result) -> str:
    rate = result.frames_now / result.seconds if result.seconds else 0.0
    lines = [
        f"store {result.store}: {result.done}/{result.videos} videos done, {result.failed} failed",
        f"this run encoded {result.encoded_now} videos / {result.frames_now} frames "
        f"in {result.seconds:.1f} s ({rate:.0f} frames/s including start-up)",
    ]
    if result.failures:
        lines.append("failed videos (see `fsar cache info`):")
        lines += [f"  {video_id}: {reason}" for video_id, reason in result.failures[:20]]
        if len(result.failures) > 20:
            lines.append(f"  ... and {len(result.failures) - 20} more")
    return "\n".join(lines)


def splits(command: str, args: argparse.Namespace) -> int:
    from fsar.data import split_registry as registry

    if command == "list":
        for name, variant in sorted(registry.load_registry().items()):
            print(f"{name:<24} {variant.benchmark:<11} {variant.description}")
        return 0
    if command == "fetch":
        dest = Path(args.dest) if args.dest else None
        path = registry.fetch_split(args.name, dest, mirror=args.mirror)
        print(f"fetched and verified {args.name} -> {path}")
        return 0
    report = registry.verify_split_dir(
        Path(args.directory), root=Path(args.root) if args.root else None
    )
    print(registry.format_verify_report(report))
    return 0 if report.ok else 1


def cache(command: str, path: Path) -> int:
    from fsar.cache import format_summary, open_store

    store = open_store(path)
    if command == "info":
        print(format_summary(store.summary()))
        return 0
    problems = store.verify()
    if problems:
        print(f"{path}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"{path}: OK ({len(store.video_ids)} videos, fingerprint {store.fingerprint[:16]})")
    return 0


def demo(workdir: Path, model: str) -> int:
    """Render the synthetic dataset (SPEC 8) and extract it with a tiny random-init CLIP."""
    from fsar.data.synthetic import render_demo_dataset
    from fsar.extract.runner import run_extraction

    videos = workdir / "videos"
    if not (videos / "testlist.txt").is_file():
        info = render_demo_dataset(videos)
        print(f"rendered the demo dataset into {videos} ({len(info.classes)} classes)")
    store = workdir / f"demo_{model}.zarr"
    config = load_config(
        [],
        [
            "dataset.name=demo",
            f"dataset.root={videos}",
            f"model.name={model}",
            f"extract.out={store}",
            "extract.frames=reference_test",
            "extract.views=[center,flip]",
        ],
    )
    print(format_extract_result(run_extraction(config)))
    print(
        "demo: extraction done. Training and evaluating the heads on this store arrive with the "
        "pipelines stage (fsar train / fsar eval); inspect the store with "
        f"`fsar cache info {store}`."
    )
    return 0


def show_config(config: Config) -> int:
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0
