"""Report plots say what they show: one colour per head across panels, titled confusions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.colors import to_hex

from fsar.pipelines.plots import confusion_figure, confusion_title, learning_curves_figure


def write_run(run_dir: Path, trained: bool, test_split: bool = False) -> Path:
    """metrics.jsonl of a run; a parameter-free head (``trained=False``) only logs scores."""
    run_dir.mkdir(parents=True)
    records = []
    for step in (10, 20, 30):
        if trained:
            records.append({"kind": "train", "step": step, "loss": 3.0 / step})
        records.append({"kind": "val", "step": step, "split": "val", "accuracy": 40.0 + step})
        if test_split:
            records.append({"kind": "val", "step": step, "split": "test", "accuracy": 35.0 + step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def colours_by_label(ax) -> dict[str, str]:
    return {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()}


def test_each_run_keeps_its_colour_in_both_panels_even_after_a_run_without_loss(tmp_path):
    runs = [
        write_run(tmp_path / "otam", trained=True),
        write_run(tmp_path / "proto_mean", trained=False),  # scored only: no loss line
        write_run(tmp_path / "clipspm", trained=True, test_split=True),
    ]
    loss_ax, acc_ax = learning_curves_figure(runs).axes[:2]
    loss, acc = colours_by_label(loss_ax), colours_by_label(acc_ax)
    assert sorted(loss) == ["clipspm", "otam"]
    assert sorted(acc) == ["clipspm", "clipspm (test)", "otam", "proto_mean"]
    for name in loss:
        assert loss[name] == acc[name], name
    assert acc["clipspm (test)"] == acc["clipspm"]  # same head, dashed
    assert len(set(acc[name] for name in ("otam", "proto_mean", "clipspm"))) == 3
    styles = {line.get_label(): line.get_linestyle() for line in acc_ax.get_lines()}
    assert styles["clipspm"] == "-" and styles["clipspm (test)"] == "--"


def test_a_confusion_plot_is_titled_with_head_split_and_shot():
    result = {"label": "clipspm_release", "head": "clipspm", "dataset": "hmdb51", "split": "test",
              "way": 5, "shot": 1}  # fmt: skip
    title = confusion_title(result)
    assert title == "clipspm (clipspm_release): hmdb51 test, 5-way 1-shot"
    fig = confusion_figure(np.array([[3, 1], [0, 4]]), ["run", "jump"], title)
    assert fig.axes[0].get_title().startswith(title)
    same = dict(result, label="clipspm")
    assert confusion_title(same) == "clipspm: hmdb51 test, 5-way 1-shot"
