"""fsar report: markdown table in the papers' layout, CSV, and PNG plots from real files."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fsar.pipelines.evaluate import interval
from fsar.pipelines.plots import PlotError, plot_confusion
from fsar.pipelines.report import (
    ReportError,
    load_results,
    read_confusion_csv,
    results_table,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_result(
    label: str,
    dataset: str,
    shot: int,
    split: str = "test",
    selection_split: str = "val",
    seed: int = 0,
    head: str = "clipspm",
    episodes: int = 200,
    **extra,
) -> dict:
    """A result as `fsar eval` writes it, scored from simulated per-episode accuracies."""
    # distinct numbers per result, so a value found in a row cannot come from another cell
    rng = np.random.default_rng(zlib.crc32(f"{label}/{dataset}/{shot}/{split}/{seed}".encode()))
    per_episode = rng.binomial(5 * 5, 0.6 + 0.05 * shot, size=episodes) / 25.0
    return {
        "kind": "fsar-eval/1",
        "label": label,
        "head": head,
        "regime": "frozen cache",
        "backbone": "RN50",
        "weights": "openai",
        "dataset": dataset,
        "variant": "hmdb_ARN" if dataset == "hmdb51" else None,
        "split": split,
        "way": 5,
        "shot": shot,
        "query": 5,
        "episodes": episodes,
        "episodes_sha256": "ab" * 32,
        "seed": seed,
        "accuracy": float(100 * per_episode.mean()),
        "ci95": interval(per_episode),
        "std": float(100 * per_episode.std()),
        "protocol": {
            "preset": "clipspm_release" if selection_split == "test" else "fsar",
            "selection_split": selection_split,
            "test_frames": "reference_test",
            "train_shot": shot,
            "train_query": 4,
            "train_views": 1,
        },
        "selection": {
            "split": selection_split,
            "step": 300,
            "accuracy": 70.0,
            "episodes": 10000 if selection_split == "test" else 500,
        },
        "checkpoint": None,
        "official": None,
        "run_dir": None,
        "store": {"path": "cache/x", "fingerprint": "f" * 16, "normalize": "clip"},
        "per_class": {"a": 80.0, "b": 60.0},
        **extra,
    }


def write_json(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def cell(result: dict, marker: str = "") -> str:
    return f"{result['accuracy']:.1f} ± {result['ci95']:.1f}{marker}"


def make_run(run_dir: Path, steps: int = 6) -> Path:
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"kind": "train", "step": step * 10, "loss": 2.0 / step,
                      "train_accuracy": 40.0 + 5 * step, "episodes_per_s": 12.0})  # fmt: skip
        if step % 2 == 0:
            lines.append({"kind": "val", "step": step * 10, "split": "val",
                          "accuracy": 50.0 + 3 * step, "ci95": 1.5})  # fmt: skip
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text + '{"kind": "train", "st')  # torn by a kill
    return run_dir


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > min_bytes, f"{path.name} is suspiciously small ({len(data)} bytes)"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= 300 and height >= 300


@pytest.fixture
def results_dir(tmp_path) -> tuple[Path, dict[str, dict]]:
    """Results as files: clipspm selected on test (release preset) and on val, val and test
    rows, a baseline, a non-result JSON to skip, and a confusion matrix on one result."""
    results = {
        "spm_hmdb_1": make_result("clipspm", "hmdb51", 1, selection_split="test"),
        "spm_hmdb_5": make_result("clipspm", "hmdb51", 5, selection_split="test"),
        "spm_kin_1": make_result("clipspm", "kinetics", 1, selection_split="test"),
        "spm_hmdb_1_val": make_result(
            "clipspm", "hmdb51", 1, split="val", selection_split="test", seed=3
        ),
        "proto_hmdb_1": make_result("proto_mean", "hmdb51", 1, head="proto_mean"),
        "proto_demo_1": make_result("proto_mean", "demo", 1, head="proto_mean"),
        "proto_ssv2_1": make_result(
            "proto_mean", "ssv2_small", 1, head="proto_mean", confusion_csv="c.csv"
        ),
    }
    root = tmp_path / "evals"
    for name, payload in results.items():
        folder = root / "nested" if "proto" in name else root  # directories are searched deep
        write_json(folder / f"{name}.json", payload)
    write_json(root / "config.json", {"kind": "something-else", "x": 1})
    # the confusion CSV as `fsar eval` writes it beside the result of proto_ssv2_1
    rows = ["true \\ predicted,jump,run,sit", "jump,8,1,1", "run,2,7,1", "sit,0,3,5"]
    (root / "nested" / "c.csv").write_text("\n".join(rows) + "\n")
    return root, results


def test_report_table_has_papers_layout_markers_and_notes(results_dir, tmp_path, shared):
    root, results = results_dir
    run = make_run(tmp_path / "runs" / "clipspm_hmdb_1shot")
    published = yaml.safe_load((shared / "reference" / "paper_results.yaml").read_text())
    report = write_report([root], tmp_path / "report", run_dirs=[run], published=published)
    text = report.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = table[0]
    # datasets in the papers' order, other datasets after them
    order = ["kinetics 1-shot", "ssv2_small 1-shot", "hmdb51 1-shot", "hmdb51 5-shot", "demo"]
    positions = [header.index(name) for name in order]
    assert positions == sorted(positions)
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    spm_test = next(v for k, v in rows.items() if k.startswith("CLIP-SPM") and "| test |" in v)
    spm_val = next(v for k, v in rows.items() if k.startswith("CLIP-SPM") and "| val |" in v)
    assert cell(results["spm_hmdb_1"], "†") in spm_test
    assert cell(results["spm_hmdb_5"], "†") in spm_test
    assert cell(results["spm_kin_1"], "†") in spm_test
    assert cell(results["spm_hmdb_1_val"], "†") in spm_val
    assert cell(results["spm_hmdb_1_val"]) not in spm_test  # val and test are separate rows
    # methods in the papers' order (the registry's: baselines first), named by their titles
    methods = [k.split(" (")[0] for k in rows if not k.startswith("published")]
    assert methods == ["Frame-mean prototypes", "CLIP-SPM", "CLIP-SPM"]
    assert "CLIP-SPM: arXiv 2512.19036" in text
    proto = next(v for k, v in rows.items() if k.startswith("Frame-mean prototypes"))
    assert cell(results["proto_hmdb_1"]) + " |" in proto  # selected on val: no marker
    assert "†" not in proto
    assert "model selected on the test split, as the releases do" in text
    # published row for clipspm RN50, with the release's 77.4 / 84.5 on HMDB51
    published_row = next(v for k, v in rows.items() if k.startswith("published CLIP-SPM"))
    assert "| 77.4 | 84.5 |" in published_row and "| 90.9 |" in published_row
    assert "published CLIP-SPM RN50: CLIP-SPM release README" in text
    assert not any(k.startswith("published Frame-mean") for k in rows)  # no release numbers
    notes = text[text.index("Notes:") :]
    assert "5-way, 200 episodes" in notes
    assert "preset clipspm_release" in notes and "preset fsar" in notes
    assert "test frames reference_test" in notes
    assert "model selected on test (10000 validation episodes)" in notes
    assert "hmdb51: hmdb_ARN" in notes and "kinetics: default" in notes
    assert "1.96·std/√n" in notes
    for png in ("accuracy_vs_shot.png", "learning_curves.png"):
        assert f"]({png})" in text
        assert_png(tmp_path / "report" / png)
    confusions = sorted((tmp_path / "report").glob("confusion_*.png"))
    assert len(confusions) == 1 and "ssv2_small_1shot" in confusions[0].name
    assert_png(confusions[0])


def test_csv_has_one_line_per_result_and_a_missing_confusion_csv_is_named(results_dir, tmp_path):
    root, results = results_dir
    (root / "nested" / "c.csv").unlink()  # a result copied without its confusion CSV
    text = write_report([root], tmp_path / "report").read_text()
    assert "c.csv not found beside it" in text
    assert not list((tmp_path / "report").glob("confusion_*.png"))
    with (tmp_path / "report" / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(results)
    by_source = {Path(r["source"]).stem: r for r in rows}
    for name, result in results.items():
        row = by_source[name]
        assert float(row["accuracy"]) == pytest.approx(result["accuracy"])
        assert float(row["ci95"]) == pytest.approx(result["ci95"])
        assert row["protocol.selection_split"] == result["protocol"]["selection_split"]
        assert row["store.fingerprint"] == result["store"]["fingerprint"]
        assert int(row["shot"]) == result["shot"]
    assert not any(name.startswith("per_class") for name in rows[0])
    assert by_source["proto_ssv2_1"]["confusion_csv"] == "c.csv"


def test_read_confusion_csv_round_trips_and_rejects_a_ragged_table(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("true \\ predicted,a,b\na,3,1\nb,0,4\n")
    matrix, classes = read_confusion_csv(path)
    assert classes == ["a", "b"]
    np.testing.assert_array_equal(matrix, [[3, 1], [0, 4]])
    path.write_text("true \\ predicted,a,b\na,3\nb,0,4\n")
    with pytest.raises(ReportError, match="not square"):
        read_confusion_csv(path)


def test_two_results_in_one_cell_are_both_shown(tmp_path):
    a = make_result("clipspm", "hmdb51", 1, seed=0)
    b = make_result("clipspm", "hmdb51", 1, seed=1, episodes=300)
    paths = [write_json(tmp_path / "a.json", a), write_json(tmp_path / "b.json", b)]
    text = results_table(load_results(paths))
    row = next(line for line in text.splitlines() if line.startswith("| CLIP-SPM"))
    assert f"{cell(a)} / {cell(b)} ‡" in row
    assert "holds 2" in text and "a.json" in text and "b.json" in text
    assert "200, 300 episodes" in text


def test_load_results_names_a_file_that_is_not_valid_json(tmp_path):
    write_json(tmp_path / "evals" / "good.json", make_result("clipspm", "hmdb51", 1))
    bad = tmp_path / "evals" / "sub" / "torn.json"
    bad.parent.mkdir()
    bad.write_text('{"kind": "fsar-eval/1", "accuracy": 7')
    with pytest.raises(ReportError, match=r"torn\.json: not a valid JSON file"):
        load_results([tmp_path / "evals"])


def test_load_results_rejects_an_explicit_file_of_another_kind_or_incomplete(tmp_path):
    other = write_json(tmp_path / "other.json", {"kind": "checkpoint-meta"})
    with pytest.raises(ReportError, match=r"other\.json: not an fsar eval result"):
        load_results([other])
    partial = make_result("clipspm", "hmdb51", 1)
    del partial["ci95"], partial["shot"]
    path = write_json(tmp_path / "partial.json", partial)
    with pytest.raises(ReportError, match=r"partial\.json: eval result lacks shot, ci95"):
        load_results([path])
    with pytest.raises(ReportError, match="no such result"):
        load_results([tmp_path / "missing.json"])


def test_confusion_plot_checks_its_shapes(tmp_path):
    with pytest.raises(PlotError, match="square"):
        plot_confusion(np.zeros((2, 3)), ["a", "b"], tmp_path / "c.png")
    with pytest.raises(PlotError, match="2 class names for a 3-class"):
        plot_confusion(np.eye(3), ["a", "b"], tmp_path / "c.png")
