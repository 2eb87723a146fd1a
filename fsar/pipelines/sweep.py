"""``fsar sweep SWEEP.yaml``: whole tables, datasets x backbones x methods x shots (x seeds).

Each combination is composed like a ``fsar train`` command line (the dataset and model files,
then the sweep's config file patterns, then its overrides) and trained and scored as one job per
seed of ``fsar.pipelines.jobs``, with the ablation's machinery: ``jobs`` at a time, a shard per
machine, finished runs skipped. Each table cell (dataset, backbone, method, shot) becomes one
``fsar eval`` result (the mean over its seeds) in ``results/``, and ``report/`` is what
``fsar report results/`` writes: the papers' layout.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsar.atomic import atomic_file, write_atomic
from fsar.config import (
    ConfigError,
    RunsConfig,
    build_dataclass,
    check_head_batching,
    check_runs,
    config_dir,
    load_config,
    parse_override,
    parse_yaml,
)
from fsar.heads.spec import option as _f
from fsar.pipelines.jobs import (
    Job,
    job_config,
    read_plan,
    read_results,
)
from fsar.pipelines.pool import Schedule, run_plan
from fsar.pipelines.report import read_confusion_csv, write_report
from fsar.pipelines.seeds import GroupSummary, summarize

AXES = ("dataset", "backbone", "method", "shot")


@dataclass
class SweepConfig(RunsConfig):
    """A sweep file (configs/sweeps/*.yaml); the run settings come from the files it names."""

    out: str | None = _f(None, "sweep folder: runs/, results/ (one result per cell), report/")
    datasets: list[str] = _f([], "datasets; configs/datasets/<name>.yaml is composed when shipped")
    backbones: list[str] = _f(
        [], "model names (RN50, ViT-B-16, ...); configs/models/<name>.yaml is composed when shipped"
    )
    methods: list[str] = _f([], "heads (fsar heads)")
    shots: list[int] = _f([1, 5], "K of the 5-way K-shot tests")
    store: str | None = _f(
        None, "feature store path pattern: {dataset}, {backbone}, {method}, {shot} are filled in"
    )
    stores: dict[str, str] = _f(
        {},
        "cells whose store is not the pattern's: {dataset}_{backbone}_{method}_{K}shot -> path "
        "(e.g. a cell whose experiment file changes the pixel normalisation)",
    )
    config: list[str] = _f(
        [],
        "config file patterns (same fields) composed in order after the dataset and model files, "
        "e.g. configs/experiments/{method}/{dataset}_{backbone}_{shot}shot.yaml; a missing "
        "file is an error",
    )
    overrides: list[str] = _f([], "key=value settings of every run, applied after the files")
    published: str | None = _f(
        None, "YAML of published accuracies: extra report rows (as fsar report --published)"
    )


def load_sweep(path: str | Path | None, overrides: list[str] = ()) -> SweepConfig:
    """A checked sweep file with top-level ``key=value`` overrides (e.g. from flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"sweep file not found: {path}")
        data = parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a sweep file is a mapping of keys (datasets, methods, ...)")
    for item in overrides:
        key, value = parse_override(item)
        data[key] = value
    sweep = build_dataclass(SweepConfig, data, prefix="")
    check_runs(sweep, "")
    for key in ("datasets", "backbones", "methods", "shots"):
        if not getattr(sweep, key):
            raise ConfigError(f"{key} of the sweep is empty: list at least one")
    for key in ("out", "store"):
        if not getattr(sweep, key):
            raise ConfigError(f"{key} of the sweep is not set (e.g. --out outputs/sweeps/NAME)")
    return sweep


def cell_name(fields: dict[str, Any]) -> str:
    return f"{fields['dataset']}_{fields['backbone']}_{fields['method']}_{fields['shot']}shot"


def sweep_jobs(sweep: SweepConfig) -> list[Job]:
    """One job per cell and seed, every run's settings checked before any trains."""
    out, jobs, missing = Path(sweep.out), [], []
    for values in itertools.product(sweep.datasets, sweep.backbones, sweep.methods, sweep.shots):
        fields = dict(zip(AXES, values, strict=True))
        files = [
            config_dir() / section / f"{name}.yaml"
            for section, name in (("datasets", fields["dataset"]), ("models", fields["backbone"]))
            if (config_dir() / section / f"{name}.yaml").is_file()
        ]
        files += [Path(_fill(pattern, fields, "config")) for pattern in sweep.config]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            missing += absent
            continue
        cell = cell_name(fields)
        store = sweep.stores.get(cell) or _fill(sweep.store, fields, "store")
        settings = [
            f"head.name={fields['method']}",
            *sweep.overrides,
            f"dataset.name={fields['dataset']}",
            f"model.name={fields['backbone']}",
            f"episodes.shot={fields['shot']}",
            f"train.store={store}",
        ]
        try:
            base = load_config(files, settings)
            for seed in range(base.train.seed, base.train.seed + sweep.seeds):
                name = f"runs/{cell}/seed={seed}"
                config = job_config(base, {"train.seed": seed}, out / name)
                check_head_batching(config)
                jobs.append(Job(name, cell, fields, seed, config))
        except ConfigError as err:
            raise ConfigError(f"sweep cell {cell}: {err}") from err
    unknown = sorted(set(sweep.stores) - {job.group for job in jobs})
    if unknown and not missing:
        raise ConfigError(f"stores names cells the sweep does not have: {', '.join(unknown)}")
    if missing:
        shown = ", ".join(sorted(set(missing))[:4])
        raise ConfigError(
            f"{len(set(missing))} config file(s) named by the sweep do not exist (e.g. {shown})"
        )
    return jobs


def _fill(pattern: str, fields: dict[str, Any], key: str) -> str:
    try:
        return pattern.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"sweep {key} pattern {pattern!r}: only {{dataset}}, {{backbone}}, {{method}} and "
            f"{{shot}} can be filled in ({err})"
        ) from err


def run_sweep(sweep: SweepConfig, progress: bool = True) -> Path | None:
    """Run this shard's jobs (skipping finished ones); when every run of the sweep has its
    result, write results/ and report/ and return report.md (None while shards are missing)."""
    out = Path(sweep.out)
    jobs = sweep_jobs(sweep)
    info = {"published": _published_path(sweep.published)}
    if not run_plan("sweep", jobs, info, Schedule.of(sweep), out, progress):
        return None
    return collect_sweep(out)


def _published_path(path: str | None) -> str | None:
    if path and not Path(path).is_file():
        raise ConfigError(f"published {path}: no such file")
    return path


def collect_sweep(out: Path) -> Path:
    """results/<cell>.json (one fsar eval result per cell, the mean over its seeds) and the
    report in the papers' layout, from ``out/plan.json`` and the runs' results."""
    out = Path(out)
    plan = read_plan(out, "sweep")
    records = read_results(out, plan)
    paths = [
        write_cell(group, out, out / "results" / f"{cell}.json")
        for cell, group in summarize(records).items()
    ]
    published = plan["info"].get("published")
    table = None
    if published:
        if not Path(published).is_file():
            raise ConfigError(f"published {published} (named by {out}/plan.json): no such file")
        table = parse_yaml(Path(published).read_text(), published)
    return write_report(paths, out / "report", published=table)


def write_cell(group: GroupSummary, out: Path, path: Path) -> Path:
    """One ``fsar-eval/1`` result for a cell: its seeds' mean accuracy, the 95% interval of the
    seed-averaged per-episode accuracies, the confusion counts summed over seeds."""
    first = group.records[0]["result"]
    averaged = group.per_episode.mean(0)
    selection = first["selection"]
    if selection is not None:
        selection = {**selection, "accuracy": group.selection_accuracy}
        selection["step"] = [r["result"]["selection"]["step"] for r in group.records]
    result = {
        **first,
        "accuracy": group.accuracy,
        "ci95": group.ci95,
        "std": float(100.0 * averaged.std()),
        "train_seeds": group.seeds,
        "seed_accuracies": group.seed_accuracies,
        "seed_std": group.seed_std,
        "selection": selection,
        "runs": [r["name"] for r in group.records],
        "path": str(path),
    }
    result.pop("checkpoint", None)
    result.pop("run_dir", None)
    confusion, classes = None, None
    for record in group.records:
        table = out / record["name"] / record["result"]["confusion_csv"]
        matrix, names = read_confusion_csv(table)
        if classes is not None and names != classes:
            raise ConfigError(f"{table}: other classes than the cell's first seed")
        confusion, classes = (matrix if confusion is None else confusion + matrix), names
    result["confusion_csv"] = path.stem + "_confusion.csv"
    with atomic_file(path.with_name(result["confusion_csv"]), "w") as file:
        writer = csv.writer(file)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, np.asarray(confusion), strict=True):
            writer.writerow([name, *(int(v) for v in row)])
    write_atomic(path, json.dumps(result, indent=2) + "\n")
    return path
