"""``fsar ablate``: a grid of head switches and hyper-parameters on one store, one episode list.

Every grid point is trained with the same seeds on the same store and scored on the same
evaluation episodes, so the table's paired differences against the first point (the baseline)
come with their own 95% intervals. Each (point, seed) is one job of ``fsar.pipelines.jobs``:
jobs run one after another, ``ablate.jobs`` at a time, or a shard of them per machine, and the
table is always built from the jobs' result files (``collect_ablation``).
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

from fsar.atomic import atomic_file, write_atomic
from fsar.config import Config, ConfigError, check_head_batching, with_overrides
from fsar.pipelines.jobs import (
    Job,
    JobsError,
    job_config,
    read_plan,
    read_results,
)
from fsar.pipelines.pool import Schedule, run_plan
from fsar.pipelines.seeds import paired, summarize


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product in the order given; the first point is the baseline."""
    if not grid:
        raise ConfigError("ablate.grid is empty: give e.g. ablate.grid={head.hsmr: [true, false]}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"ablate.grid.{key} must be a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def point_name(point: dict[str, Any]) -> str:
    return "__".join(f"{key.split('.')[-1]}={value}" for key, value in point.items())


def ablation_jobs(config: Config) -> list[Job]:
    """One job per grid point and seed (seeds train.seed, train.seed + 1, ... of the point), in
    table order; each is checked before any trains (a typo in the last point must not cost a
    night)."""
    out = Path(config.ablate.out)
    jobs = []
    for point in grid_points(config.ablate.grid):
        first_seed = with_overrides(config, point).train.seed
        for seed in range(first_seed, first_seed + config.ablate.seeds):
            name = f"{point_name(point)}/seed={seed}"
            settings = job_config(config, {**point, "train.seed": seed}, out / name)
            check_head_batching(settings)
            jobs.append(Job(name, point_name(point), point, seed, settings))
    return jobs


def run_ablation(config: Config, progress: bool = True) -> Path | None:
    """Train and evaluate the grid points of this shard (skipping finished ones); when every
    point of the grid has its result, write table.md / table.csv / ablation.json and return
    table.md (None while other shards' points are missing)."""
    if not config.ablate.out:
        raise ConfigError("ablate.out is not set: pass --out ABLATION_DIR")
    out = Path(config.ablate.out)
    jobs = ablation_jobs(config)
    info = {"keys": list(config.ablate.grid), "seeds": config.ablate.seeds}
    if not run_plan("ablate", jobs, info, Schedule.of(config.ablate), out, progress):
        return None
    return collect_ablation(out)


def collect_ablation(out: Path) -> Path:
    """table.md, table.csv and ablation.json from ``out/plan.json`` and the jobs' results."""
    out = Path(out)
    plan = read_plan(out, "ablate")
    records = read_results(out, plan)
    if len({r["result"]["episodes_sha256"] for r in records}) != 1:
        raise JobsError(f"the grid points in {out} were scored on different episode lists")
    if len({json.dumps(r["stores"], sort_keys=True) for r in records}) != 1:
        raise JobsError(f"the grid points in {out} were trained or scored on different stores")
    return write_tables(plan, records, out)


def write_tables(plan: dict[str, Any], records: list[dict[str, Any]], out: Path) -> Path:
    keys = plan["info"]["keys"]
    groups = list(summarize(records).values())
    base = groups[0]
    many = any(len(g.records) > 1 for g in groups)
    rows, entries = [], []
    for group in groups:
        diff = paired(group, base)
        labels = group.records[0]["labels"]
        selection = group.selection_accuracy
        rows.append(
            [labels[k] for k in keys]
            + [
                round(group.accuracy, 2),
                round(group.ci95, 2),
                round(diff.difference, 2),
                round(diff.ci95, 2),
                round(selection, 2) if selection is not None else None,
                len(group.records),
                round(group.seed_std, 2) if group.seed_std is not None else None,
            ]
        )
        entries.append(
            {
                "point": labels,
                "seeds": group.seeds,
                "accuracy": group.accuracy,
                "ci95": group.ci95,
                "seed_std": group.seed_std,
                "seed_accuracies": group.seed_accuracies,
                "diff_vs_first": diff.difference,
                "diff_ci95": diff.ci95,
                "selection_accuracy": selection,
                "result": group.records[0]["result"],  # the first seed's
                "results": [r["result"] for r in group.records],
            }
        )
    header = keys + ["accuracy", "ci95", "diff_vs_first", "diff_ci95", "selection_accuracy"]
    with atomic_file(out / "table.csv", "w") as file:
        writer = csv.writer(file)
        writer.writerow(header + ["seeds", "seed_std"])
        writer.writerows(rows)
    lines = _intro(records, groups, many) + [
        "| "
        + " | ".join(keys)
        + (" | accuracy | seed std" if many else " | accuracy")
        + " | diff vs first | selection acc |",
        "|" + "---|" * (len(keys) + (4 if many else 3)),
    ]
    for values in rows:
        point, (acc, ci, diff, diff_ci, sel, _, std) = values[: len(keys)], values[len(keys) :]
        cells = [str(v) for v in point] + [f"{acc:.2f} ± {ci:.2f}"]
        cells += [f"{std:.2f}" if std is not None else "-"] if many else []
        cells += [f"{diff:+.2f} ± {diff_ci:.2f}", "-" if sel is None else f"{sel:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    write_atomic(out / "table.md", "\n".join(lines) + "\n")
    write_atomic(out / "ablation.json", json.dumps(entries, indent=2) + "\n")
    return out / "table.md"


def _intro(records: list[dict[str, Any]], groups, many: bool) -> list[str]:
    first = records[0]["result"]
    seeds = sorted({r["seed"] for r in records})
    threads = sorted({r["threads"] for r in records})
    devices = sorted({r["device"] for r in records})
    if many:
        seeds_text = (
            f"{len(groups[0].records)} training seeds per point (train.seed "
            f"{', '.join(map(str, seeds))}): accuracy is the mean over seeds ± the 95% interval "
            "of the seed-averaged per-episode accuracies, seed std the sample std of the seeds' "
            "accuracies, differences are paired on (seed, episode) against the first row"
        )
    else:
        seeds_text = (
            f"train.seed {seeds[0] if len(seeds) == 1 else seeds}; differences are paired on "
            "identical episodes against the first row"
        )
    return [
        f"# Ablation: {first['label']} on {first['dataset']} ({first['backbone']}, frozen cache)",
        "",
        f"{first['split']} split, {first['way']}-way {first['shot']}-shot, {first['episodes']} "
        f"episodes (sha256 {first['episodes_sha256'][:12]}), selection on "
        f"{first['protocol']['selection_split']}; intervals are 95% (1.96 std / sqrt(n)); "
        f"{seeds_text}. Each run trained with {' / '.join(map(str, threads))} CPU thread(s) "
        f"(ablate.threads) on {', '.join(devices)}"
        + (
            " (mixed thread counts: CPU numbers may differ by float rounding)"
            if len(threads) > 1
            else ""
        )
        + ".",
        "",
    ]
