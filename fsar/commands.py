"""What each sub-command does, in terms of the packages; printing is the only thing added here."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from fsar.config import Config, ConfigError, parse_yaml, to_dict
from fsar.heads.registry import HEADS


def extract(config: Config) -> int:
    from fsar.extract.runner import run_extraction

    result = run_extraction(config)
    if result.rank != 0:  # under torchrun only rank 0 reports
        return 0
    print(format_extract_result(result))
    return 0


def format_extract_result(result) -> str:
    """What an extraction did: the store's state per split, then what this run encoded."""
    rate = result.frames_now / result.seconds if result.seconds else 0.0
    lines = [
        f"store {result.store}: {result.done}/{result.videos} videos done, {result.failed} failed "
        f"to decode, {result.missing} missing from --root"
    ]
    for split, c in result.counts.items():
        listed = sum(c.values())
        lines.append(
            f"  {split:<6} {listed} listed: {listed - c['missing']} found, {c['missing']} "
            f"missing; {c['done']} done, {c['failed']} failed, {c['pending']} pending"
        )
    lines.append(
        f"this run encoded {result.encoded_now} videos / {result.frames_now} frames "
        f"in {result.seconds:.1f} s ({rate:.0f} frames/s including start-up); "
        f"{result.failed_now} failed to decode, {result.missing_now} missing"
    )
    if result.failures:
        lines.append("failed videos (see `fsar cache info`):")
        lines += [f"  {video_id}: {reason}" for video_id, reason in result.failures[:20]]
        if len(result.failures) > 20:
            lines.append(f"  ... and {len(result.failures) - 20} more")
    if result.missing_ids:
        shown = ", ".join(result.missing_ids[:5])
        more = f" and {len(result.missing_ids) - 5} more" if len(result.missing_ids) > 5 else ""
        lines.append(
            f"missing from --root: {shown}{more} (`fsar cache info {result.store}` lists them; "
            "copy them in and rerun to add them)"
        )
    return "\n".join(lines)


def frames(
    config: Config,
    video_ids: list[str],
    out: Path,
    sheet: Path | None,
    seed: int,
    draws: int | None,
) -> int:
    from fsar.extract.frames_dump import dump_frames

    result = dump_frames(config, video_ids, out, sheet=sheet, seed=seed, draws=draws)
    prep = result.preprocess
    print(
        f"{len(result.rows)} clip(s) of [T, 3, {result.input_size}, {result.input_size}] float32 "
        f"-> {result.npz}; contact sheet -> {result.sheet}\n"
        f"pixels: {prep.resize_mode} {prep.resize} ({prep.interpolation}), crop {prep.crop} "
        f"({prep.crop_offset}), "
        + (f"mean {list(prep.mean)} std {list(prep.std)}" if prep.normalize else "no normalisation")
    )
    for label, indices in result.rows:
        print(f"  {label}: frames {indices}")
    return 0


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
    from fsar.cache.backends import StoreReadError

    try:
        store = open_store(path)
    except StoreReadError as err:
        if command == "info":
            raise
        print(f"{path}: 1 problem(s)\n  - {err}")
        return 1
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


def train(config: Config) -> int:
    from fsar.pipelines.train import train_heads

    result = train_heads(config)
    best = f"{result.best_accuracy:.2f}" if result.best_step >= 0 else "-"
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    print(
        f"trained {config.head.name} for {result.steps} steps{resumed}; best "
        f"{config.protocol.selection_split} accuracy {best} at step {result.best_step} -> "
        f"{result.out / 'best.pt'}"
    )
    return 0


def finetune(config: Config) -> int:
    from fsar.pipelines.finetune import finetune as run_finetune

    result = run_finetune(config)
    if result.rank != 0:  # under torchrun only rank 0 reports
        return 0
    best = f"{result.best_accuracy:.2f}" if result.best_step >= 0 else "-"
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    print(
        f"fine-tuned {config.model.name} + {config.head.name} for {result.steps} steps on "
        f"{result.world_size} process(es){resumed}; best {config.protocol.selection_split} "
        f"accuracy {best} at step {result.best_step} -> {result.out / 'best.pt'}\n"
        f"score it on a store: fsar extract --checkpoint {result.out / 'best.pt'} ... then "
        "fsar eval --checkpoint on that store"
    )
    return 0


def evaluate(config: Config, compare_paths: list[str] | None, head: str | None = None) -> int:
    """``head``: the --head flag, checked against each checkpoint's head."""
    from fsar.pipelines.checkpoint import CheckpointError, check_requested_head
    from fsar.pipelines.evaluate import compare
    from fsar.pipelines.run_eval import format_result, run_evaluation

    for path in compare_paths or [config.eval.checkpoint]:
        if path:
            check_requested_head(path, head)
    if not compare_paths:
        result, _ = run_evaluation(config)
        print(format_result(result))
        return 0
    scored = [run_evaluation(config, checkpoint=path) for path in compare_paths]
    for result, _ in scored:
        print(format_result(result))
    (result_a, outcome_a), (result_b, outcome_b) = scored
    if result_a["episodes_sha256"] != result_b["episodes_sha256"]:
        raise CheckpointError(
            "the two checkpoints were scored on different episodes (their stores or "
            "protocols differ): compare runs evaluated on the same store with the same settings"
        )
    paired = compare(outcome_a, outcome_b)
    print(
        f"A - B = {paired.difference:+.2f} +- {paired.ci95:.2f} points (paired, "
        f"{paired.episodes} identical episodes, 95% interval)"
    )
    return 0


def ablate(config: Config) -> int:
    from fsar.pipelines.ablate import run_ablation

    table = run_ablation(config)
    if table is None:
        _shard_done(config.ablate.shard, config.ablate.out, "ablate")
        return 0
    print(table.read_text(), end="")
    print(f"-> {table} and {table.with_suffix('.csv')}")
    return 0


def ablate_collect(folder: Path) -> int:
    from fsar.pipelines.ablate import collect_ablation

    table = collect_ablation(folder)
    print(table.read_text(), end="")
    print(f"-> {table} and {table.with_suffix('.csv')}")
    return 0


def sweep(path: str, overrides: list[str]) -> int:
    from fsar.pipelines.sweep import load_sweep, run_sweep

    config = load_sweep(path, overrides)
    report = run_sweep(config)
    if report is None:
        _shard_done(config.shard, config.out, "sweep")
        return 0
    print(f"report -> {report}")
    return 0


def sweep_collect(folder: Path) -> int:
    from fsar.pipelines.sweep import collect_sweep

    print(f"report -> {collect_sweep(folder)}")
    return 0


def _shard_done(shard: str | None, out: str, command: str) -> None:
    print(
        f"{command}: shard {shard} finished; other shards' runs are still missing in {out}. "
        f"When every shard is done: fsar {command} --collect {out}"
    )


def report(paths: list[Path], out: Path, runs: list[str], published: str | None) -> int:
    from fsar.pipelines.report import write_report

    published_table = None
    if published:
        if not Path(published).is_file():
            raise ConfigError(f"--published {published}: no such file")
        published_table = parse_yaml(Path(published).read_text(), f"--published {published}")
    path = write_report(paths, out, run_dirs=[Path(r) for r in runs], published=published_table)
    print(f"report -> {path}")
    return 0


def demo(workdir: Path, model: str, steps: int | None) -> int:
    """SPEC 8: render, extract, train four heads, evaluate, report."""
    from fsar.pipelines.demo import run_demo

    result = run_demo(workdir, model, steps if steps is not None else 150)
    print(result.report.read_text(), end="")
    print(f"-> {result.report}")
    return 0


def list_heads() -> int:
    """One block per registered head: title, citation, summary, options, loss terms."""
    for spec in HEADS.values():
        options = spec.config()
        cited = f" ({spec.citation})" if spec.citation else ""
        print(f"{spec.name}: {spec.title}{cited}\n  {spec.summary}")
        shown = ", ".join(f"{key}={getattr(options, key)!r}" for key in options.own_fields())
        print(f"  options: {shown or 'none'}")
        terms = {"logits": 1.0, **spec.aux_weights}
        print("  loss: " + " + ".join(f"{w:g}*{k}" for k, w in terms.items() if w))
        if spec.official is not None:
            print(f"  official weights: {spec.official.release} (--official FILE)")
    return 0


def show_config(config: Config) -> int:
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0
