"""Reports over ``fsar eval`` results: a markdown table in the papers' layout, a CSV, PNG plots.

The table has one row per (label, backbone, regime, split) and one column per (dataset, shot),
datasets in the papers' order. Everything that moves a number by points (episodes, way,
preset, test frames, split variant, where the model was selected) is written next to the table,
because none of the releases records it beside its results (SPEC 6.1).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsar.atomic import atomic_file, write_atomic
from fsar.errors import FsarError
from fsar.heads.registry import HEADS
from fsar.pipelines.plots import (
    confusion_title,
    dataset_sort_key,
    plot_accuracy_vs_shot,
    plot_confusion,
    plot_learning_curves,
)

RESULT_KIND = "fsar-eval/1"
REQUIRED_KEYS = (
    "label", "backbone", "regime", "dataset", "split", "way", "shot", "episodes", "accuracy",
    "ci95",
)  # fmt: skip
TEST_SELECTED = "†"  # marks a cell whose model was selected on the test split
DUPLICATE = "‡"  # marks a cell holding more than one result
INTERVAL = "95% interval 1.96·std/√n over the n evaluation episodes"
SPLIT_ORDER = {"val": 0, "test": 1}


class ReportError(FsarError, ValueError):
    pass


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Eval results from JSON files and directories (searched recursively for ``*.json`` whose
    ``kind`` is ``fsar-eval/1``). Each result gains ``source``: the file it came from.

    A file named explicitly must be a valid result; in a directory, JSON files of another kind
    are skipped, but a file that is not JSON at all is an error (it may be a torn result).
    """
    results = []
    for given in paths:
        given = Path(given)
        if given.is_dir():
            for file in sorted(given.rglob("*.json")):
                payload = _read_json(file)
                if isinstance(payload, dict) and payload.get("kind") == RESULT_KIND:
                    results.append(_checked(payload, file))
        elif given.is_file():
            results.append(_checked(_read_json(given), given))
        else:
            raise ReportError(f"{given}: no such result file or directory")
    return results


def results_table(
    results: Sequence[dict[str, Any]], published: dict[str, Any] | None = None
) -> str:
    """Markdown table (dataset x shot columns) followed by its legend and per-row notes.

    ``published`` is the parsed paper_results.yaml; when given, a "published" row is added for
    each (head, backbone) of the results that a release reported on.
    """
    rows = _group_rows(results)
    columns = sorted(
        {(r["dataset"], int(r["shot"])) for r in results},
        key=lambda c: (dataset_sort_key(c[0]), c[1]),
    )
    header = ["method", "backbone", "regime", "split"] + [f"{d} {s}-shot" for d, s in columns]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    notes, duplicates, any_test_selected = [], [], False
    for number, (key, cells) in enumerate(rows.items(), start=1):
        texts = []
        for column in columns:
            found = cells.get(column, [])
            texts.append(" / ".join(_cell(r) for r in found) or "—")
            any_test_selected |= any(_test_selected(r) for r in found)
            if len(found) > 1:
                texts[-1] += f" {DUPLICATE}"
                duplicates.append((number, column, found))
        lines.append(_md_row([f"{key[0]} ({number})", *key[1:], *texts]))
        notes.append(_row_note(number, key, [r for found in cells.values() for r in found]))
    published_lines, published_notes = _published_rows(results, columns, published, len(rows))
    lines += published_lines
    notes += published_notes
    legend = [f"Cells: accuracy (%) ± half-width of the {INTERVAL}."]
    cited = [HEADS[h] for h in HEADS if h in {r.get("head") for r in results}]
    if any(spec.citation for spec in cited):
        legend.append(
            "Methods: " + "; ".join(f"{s.title}: {s.citation}" for s in cited if s.citation) + "."
        )
    if published_lines:
        legend.append("Published rows: 5-way test accuracy as the source reports it.")
    if any_test_selected:
        legend.append(f"{TEST_SELECTED} model selected on the test split, as the releases do.")
    if duplicates:
        legend.append(f"{DUPLICATE} more than one result falls in this cell; all are shown.")
    for number, (dataset, shot), found in duplicates:
        sources = "; ".join(
            f"{r['source']} (way {r['way']}, seed {r.get('seed')}, {r['episodes']} episodes)"
            for r in found
        )
        notes.append(f"- row ({number}), {dataset} {shot}-shot holds {len(found)}: {sources}")
    return "\n".join(lines + [""] + legend + ["", "Notes:", ""] + notes) + "\n"


def write_csv(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One line per result with every scalar field; nested sections become dotted columns
    (``protocol.preset``); per-class accuracies are left to the JSON."""
    flat = [_flatten(r) for r in results]
    fields: list[str] = []
    for row in flat:
        fields += [name for name in row if name not in fields]
    path = Path(path)
    with atomic_file(path, "w") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    return path


def write_report(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    run_dirs: Iterable[str | Path] = (),
    published: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.md``, ``results.csv`` and the PNG plots into ``out_dir``.

    Learning curves are drawn when ``run_dirs`` are given; a confusion heatmap for each result
    whose ``confusion_csv`` (a file beside the result JSON) is present.
    """
    paths = list(paths)
    results = load_results(paths)
    if not results:
        raise ReportError(f"no {RESULT_KIND} results found in {[str(p) for p in paths]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "results.csv")
    plots = [("accuracy vs. shot", plot_accuracy_vs_shot(results, out / "accuracy_vs_shot.png"))]
    run_dirs = list(run_dirs)
    if run_dirs:
        plots.append(
            ("learning curves", plot_learning_curves(run_dirs, out / "learning_curves.png"))
        )
    missing = []
    for index, r in enumerate(results):
        if not r.get("confusion_csv"):
            continue
        # `fsar eval` writes the confusion matrix as a CSV beside the result JSON.
        table = Path(r["source"]).parent / r["confusion_csv"]
        if not table.is_file():
            missing.append(f"- confusion of {r['source']}: {table.name} not found beside it")
            continue
        matrix, classes = read_confusion_csv(table)
        name = f"confusion_{index:02d}_{_slug(r['label'])}_{r['dataset']}_{r['shot']}shot.png"
        plot_confusion(matrix, classes, out / name, title=confusion_title(r))
        plots.append((f"confusion: {confusion_title(r)}", out / name))
    text = ["# fsar report", "", f"{len(results)} evaluation results.", "", "## Results", ""]
    text += [results_table(results, published), "## Plots", ""]
    text += [f"- [{title}]({p.name})\n\n  ![{title}]({p.name})" for title, p in plots]
    text += missing
    text += ["", "Files: [results.csv](results.csv)", ""]
    report = out / "report.md"
    write_atomic(report, "\n".join(text))
    return report


def read_confusion_csv(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """The ``*_confusion.csv`` of ``fsar eval``: a header row of predicted class names, then one
    row per true class (name, counts). Returns (int64 [C, C] counts, C class names)."""
    with Path(path).open(newline="") as file:
        rows = [row for row in csv.reader(file) if row]
    if not rows:
        raise ReportError(f"{path}: empty confusion CSV")
    classes = rows[0][1:]
    names = [row[0] for row in rows[1:]]
    if names != classes or any(len(row) != len(classes) + 1 for row in rows[1:]):
        raise ReportError(f"{path}: confusion CSV is not square with matching class names")
    try:
        matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]], dtype=np.int64)
    except ValueError as error:
        raise ReportError(f"{path}: confusion CSV holds a non-integer count ({error})") from error
    return matrix.reshape(len(classes), len(classes)), classes


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{file}: not a valid JSON file ({error})") from error


def _checked(payload: Any, file: Path) -> dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("kind") != RESULT_KIND:
        kind = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise ReportError(f"{file}: not an fsar eval result (kind {kind!r}, need {RESULT_KIND!r})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ReportError(f"{file}: eval result lacks {', '.join(missing)}")
    return {**payload, "source": str(file)}


def _method_rank(r: dict[str, Any]) -> int:
    """Position of the result's head in the registry (baselines, then by publication), as the
    papers list methods; heads the registry does not know come last."""
    order = list(HEADS)
    head = r.get("head")
    return order.index(head) if head in HEADS else len(order)


def _method_name(r: dict[str, Any]) -> str:
    """The method as papers name it (the head's title) unless the run was given its own label."""
    spec = HEADS.get(r.get("head"))
    return spec.title if spec is not None and r["label"] == r.get("head") else r["label"]


def _group_rows(results: Sequence[dict[str, Any]]) -> dict[tuple, dict[tuple, list[dict]]]:
    """(method, backbone, regime, split) -> (dataset, shot) -> results; methods in the papers'
    order (the registry's), then backbone, regime and split."""
    rows: dict[tuple, dict[tuple, list[dict]]] = {}
    ordered = sorted(
        results,
        key=lambda r: (
            _method_rank(r),
            r["label"],
            r["backbone"],
            r["regime"],
            SPLIT_ORDER.get(r["split"], 2),
        ),
    )
    for r in ordered:
        key = (_method_name(r), r["backbone"], r["regime"], r["split"])
        rows.setdefault(key, {}).setdefault((r["dataset"], int(r["shot"])), []).append(r)
    return rows


def _test_selected(r: dict[str, Any]) -> bool:
    return (r.get("protocol") or {}).get("selection_split") == "test"


def _cell(r: dict[str, Any]) -> str:
    marker = TEST_SELECTED if _test_selected(r) else ""
    return f"{r['accuracy']:.1f} ± {r['ci95']:.1f}{marker}"


def _row_note(number: int, key: tuple, found: list[dict[str, Any]]) -> str:
    """One notes line: the protocol choices behind every cell of a row (distinct values)."""

    def values(field: str, section: str | None = None, missing: str = "not recorded") -> str:
        seen = set()
        for r in found:
            source = (r.get(section) or {}) if section else r
            seen.add(str(source.get(field, missing)))
        return ", ".join(sorted(seen))

    variants = sorted({f"{r['dataset']}: {r.get('variant') or 'default'}" for r in found})
    # results of fsar sweep with several training seeds: each cell is their mean
    seeds = sorted({len(r["train_seeds"]) for r in found if len(r.get("train_seeds") or []) > 1})
    averaged = (
        f"; cells are means over {', '.join(map(str, seeds))} training seeds (± the interval of "
        "the seed-averaged per-episode accuracies; seed_std in results.csv)"
        if seeds
        else ""
    )
    return (
        f"- ({number}) {' · '.join(key)}: {values('way')}-way, {values('episodes')} episodes; "
        f"preset {values('preset', 'protocol')}; test frames {values('test_frames', 'protocol')}; "
        f"split variant {', '.join(variants)}; "
        f"model selected on {values('selection_split', 'protocol')} "
        f"({values('episodes', 'selection')} validation episodes); ± = {INTERVAL}{averaged}."
    )


def _published_rows(
    results: Sequence[dict[str, Any]],
    columns: list[tuple[str, int]],
    published: dict[str, Any] | None,
    n_rows: int,
) -> tuple[list[str], list[str]]:
    """Table rows and notes for the releases' numbers, numbered after the ``n_rows`` result rows."""
    lines: list[str] = []
    notes: list[str] = []
    if not published:
        return lines, notes
    pairs = sorted({(r["head"], r["backbone"]) for r in results if r.get("head")})
    for head, backbone in pairs:
        spec = HEADS.get(head)
        block = published.get(spec.published_key or "", {}) if spec else {}
        # paper_results.yaml writes "ViT-B/16" where open_clip names say "ViT-B-16".
        numbers = next(
            (v for k, v in block.items() if k.replace("/", "-") == backbone.replace("/", "-")),
            None,
        )
        if not isinstance(numbers, dict):
            continue
        cells = [numbers.get(d, {}).get(s) for d, s in columns]
        if all(c is None for c in cells):
            continue
        texts = ["—" if c is None else f"{c:.1f}" for c in cells]
        number = n_rows + len(lines) + 1
        name = spec.title if spec else head
        lines.append(_md_row([f"published {name} ({number})", backbone, "—", "test", *texts]))
        notes.append(f"- ({number}) published {name} {backbone}: {block.get('source', 'paper')}.")
    return lines, notes


def _flatten(r: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in r.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "per_class":
            flat.update(_flatten(value, f"{name}."))
        elif value is None or isinstance(value, (str, int, float, bool)):
            flat[name] = value
    return flat


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_") or "result"
