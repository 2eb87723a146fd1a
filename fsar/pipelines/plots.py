"""PNG plots for reports: learning curves, accuracy vs. shot, confusion heatmaps.

Figures are drawn on matplotlib's ``Agg`` canvas through ``matplotlib.figure.Figure`` rather
than ``pyplot``, so no global backend or figure state is touched (safe in headless runs and
tests). matplotlib is imported inside the functions to keep ``import fsar`` cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsar.atomic import atomic_file
from fsar.errors import FsarError

DATASET_ORDER = ("kinetics", "ssv2_full", "ssv2_small", "ucf101", "hmdb51")


class PlotError(FsarError, ValueError):
    pass


def dataset_sort_key(name: str) -> tuple[int, str]:
    """The papers' dataset order first, then any other dataset alphabetically."""
    if name in DATASET_ORDER:
        return DATASET_ORDER.index(name), ""
    return len(DATASET_ORDER), name


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} is not a training run: {path.name} is missing")
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A line torn by a kill (the trainer tolerates these on resume too); skip it so
            # the curves of an interrupted run can still be drawn.
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def plot_learning_curves(run_dirs: Iterable[str | Path], path: str | Path) -> Path:
    """Write ``learning_curves_figure(run_dirs)`` as a PNG."""
    return _save(learning_curves_figure(run_dirs), path)


def learning_curves_figure(run_dirs: Iterable[str | Path]):
    """Training loss and selection accuracy (with its 95% interval as a band) vs. step.

    One colour per run directory (labelled by its name, e.g. one run per head), the same in both
    panels even when a run has no loss (parameter-free heads are only scored); when a run logged
    both val and test selection records, the test line is dashed.
    """
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise PlotError("plot_learning_curves needs at least one run directory")
    fig, (ax_loss, ax_acc) = _figure(1, 2, width=11.0, height=4.0)
    for number, run in enumerate(runs):
        colour = _colour(number)
        records = read_metrics(run)
        train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"])
        if train:
            steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
            ax_loss.plot(steps, losses, color=colour, label=run.name)
        evals = [r for r in records if r.get("kind") == "val"]
        for split in sorted({r.get("split", "val") for r in evals}):
            rows = sorted((r for r in evals if r.get("split", "val") == split), key=_step)
            steps = np.array([r["step"] for r in rows], dtype=float)
            acc = np.array([r["accuracy"] for r in rows], dtype=float)
            ci = np.array([r.get("ci95", 0.0) for r in rows], dtype=float)
            label = run.name if split == "val" else f"{run.name} ({split})"
            style = "-" if split == "val" else "--"
            ax_acc.plot(steps, acc, style, color=colour, marker="o", markersize=3, label=label)
            ax_acc.fill_between(steps, acc - ci, acc + ci, color=colour, alpha=0.2)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="selection accuracy, 95% band")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


def _colour(number: int) -> str:
    """The ``number``-th colour of matplotlib's default cycle (tab10), wrapping around."""
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return cycle[number % len(cycle)]


def plot_accuracy_vs_shot(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per dataset: accuracy vs. shot with 95% error bars, one line per
    (label, backbone, regime, split)."""
    if not results:
        raise PlotError("plot_accuracy_vs_shot needs at least one result")
    datasets = sorted({r["dataset"] for r in results}, key=dataset_sort_key)
    n_cols = min(len(datasets), 3)
    n_rows = -(-len(datasets) // n_cols)
    fig, axes = _figure(n_rows, n_cols, width=4.2 * n_cols, height=3.6 * n_rows)
    for ax, dataset in zip(axes, datasets, strict=False):
        lines: dict[tuple, list[dict[str, Any]]] = {}
        for r in results:
            if r["dataset"] == dataset:
                key = (r["label"], r["backbone"], r["regime"], r["split"])
                lines.setdefault(key, []).append(r)
        for (label, backbone, regime, split), rows in lines.items():
            rows = sorted(rows, key=lambda r: r["shot"])
            ax.errorbar(
                [r["shot"] for r in rows],
                [r["accuracy"] for r in rows],
                yerr=[r["ci95"] for r in rows],
                marker="o",
                capsize=3,
                label=f"{label} {backbone} {regime} {split}",
            )
        shots = sorted({r["shot"] for r in results if r["dataset"] == dataset})
        ax.set_xticks(shots)
        ax.set(title=dataset, xlabel="shot", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes[len(datasets) :]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_confusion(
    matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "confusion"
) -> Path:
    """Write ``confusion_figure(matrix, class_names, title)`` as a PNG."""
    return _save(confusion_figure(matrix, class_names, title), path)


def confusion_title(result: dict[str, Any]) -> str:
    """What a confusion plot of an ``fsar eval`` result shows: head, run label, data, episodes."""
    head = result.get("head") or result["label"]
    label = f" ({result['label']})" if result.get("label") not in (None, head) else ""
    return (
        f"{head}{label}: {result['dataset']} {result['split']}, "
        f"{result['way']}-way {result['shot']}-shot"
    )


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str = "confusion"):
    """Heatmap of a row-normalised confusion matrix, titled ``title`` (see ``confusion_title``).

    ``matrix`` is [C, C] counts, rows = true class, columns = predicted class; a row with no
    queries stays all zero rather than dividing by zero.
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise PlotError(f"a confusion matrix must be square [C, C], got shape {matrix.shape}")
    if len(class_names) != matrix.shape[0]:
        raise PlotError(
            f"{len(class_names)} class names for a {matrix.shape[0]}-class confusion matrix"
        )
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1.0)
    size = float(np.clip(0.35 * len(class_names) + 2.5, 4.0, 16.0))
    fig, (ax,) = _figure(1, 1, width=size + 1.0, height=size)
    image = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    # Beyond ~40 classes the names overlap into an unreadable block; leave the axes bare then.
    if len(class_names) <= 40:
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, labels=list(class_names), rotation=90, fontsize="x-small")
        ax.set_yticks(ticks, labels=list(class_names), fontsize="x-small")
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}\n(row-normalised)")
    return fig


def _step(record: dict[str, Any]) -> int:
    return int(record["step"])


def _figure(n_rows: int, n_cols: int, width: float, height: float):
    """A Figure on an Agg canvas and its axes as a flat list (row-major)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, list(axes.flat)


def _save(fig, path: str | Path) -> Path:
    """Write the PNG to a temporary name, then rename: a half-written plot never appears."""
    path = Path(path)
    with atomic_file(path) as file:
        fig.savefig(file, format="png", dpi=110)
    return path
