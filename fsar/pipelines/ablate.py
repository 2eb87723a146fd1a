"""``fsar ablate``: a grid of head switches and hyper-parameters on one store, one episode list.

Every grid point is trained with the same seed on the same store and scored on the same
evaluation episodes, so the table's paired differences against the first point (the baseline)
come with their own 95% intervals.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsar.config import Config, ConfigError, check_head_batching, with_overrides
from fsar.pipelines.evaluate import EvalOutcome, compare
from fsar.pipelines.run_eval import run_evaluation
from fsar.pipelines.train import train_heads


@dataclass
class AblationRow:
    point: dict[str, Any]
    result: dict[str, Any]
    outcome: EvalOutcome


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


def run_ablation(config: Config, progress: bool = True) -> Path:
    """Train and evaluate every grid point; write table.md and table.csv; return table.md."""
    if not config.ablate.out:
        raise ConfigError("ablate.out is not set: pass --out ABLATION_DIR")
    out = Path(config.ablate.out)
    points = grid_points(config.ablate.grid)
    # Check every point before any training: a typo in the last point must not cost a night.
    configs = [
        with_overrides(
            config,
            {
                **point,
                "train.out": str(out / point_name(point)),
                "eval.out": str(out / point_name(point) / "eval.json"),
            },
        )
        for point in points
    ]
    for point_config in configs:
        check_head_batching(point_config)
    rows = []
    for point, point_config in zip(points, configs, strict=True):
        if progress:
            print(f"ablate: {point_name(point)}")
        trained = train_heads(point_config, progress=progress)
        result, outcome = run_evaluation(
            point_config, checkpoint=str(trained.out / "best.pt"), progress=progress
        )
        rows.append(AblationRow(point, result, outcome))
    digests = {row.result["episodes_sha256"] for row in rows}
    assert len(digests) == 1, "grid points were scored on different episodes"
    return write_tables(rows, out)


def write_tables(rows: list[AblationRow], out: Path) -> Path:
    keys = list(rows[0].point)
    base = rows[0]
    header = keys + ["accuracy", "ci95", "diff_vs_first", "diff_ci95", "selection_accuracy"]
    table = []
    for row in rows:
        paired = compare(row.outcome, base.outcome)
        selection = row.result["selection"]
        table.append(
            [row.point[k] for k in keys]
            + [
                round(row.result["accuracy"], 2),
                round(row.result["ci95"], 2),
                round(paired.difference, 2),
                round(paired.ci95, 2),
                round(selection["accuracy"], 2) if selection else None,
            ]
        )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "table.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(table)
    first = rows[0].result
    lines = [
        f"# Ablation: {first['label']} on {first['dataset']} ({first['backbone']}, frozen cache)",
        "",
        f"{first['split']} split, {first['way']}-way {first['shot']}-shot, {first['episodes']} "
        f"episodes (sha256 {first['episodes_sha256'][:12]}), selection on "
        f"{first['protocol']['selection_split']}; intervals are 95% (1.96 std / sqrt(n)), "
        "differences are paired on identical episodes against the first row.",
        "",
        "| " + " | ".join(keys) + " | accuracy | diff vs first | selection acc |",
        "|" + "---|" * (len(keys) + 3),
    ]
    for values in table:
        point, (acc, ci, diff, diff_ci, sel) = values[: len(keys)], values[len(keys) :]
        sel_text = "-" if sel is None else f"{sel:.2f}"
        lines.append(
            "| "
            + " | ".join(str(v) for v in point)
            + f" | {acc:.2f} ± {ci:.2f} | {diff:+.2f} ± {diff_ci:.2f} | {sel_text} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(
        json.dumps([{"point": r.point, "result": r.result} for r in rows], indent=2) + "\n"
    )
    return out / "table.md"
