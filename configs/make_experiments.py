"""Write configs/experiments/{clipspm,clipfsar}/<dataset>_<backbone>_<K>shot.yaml from the
CLIP-SPM release settings (the reference YAML), so every number in them has one source.

    python configs/make_experiments.py [REFERENCE_YAML] [--out DIR]

REFERENCE_YAML defaults to ../shared/reference/clipspm_release.yaml beside the repository;
DIR defaults to configs/experiments. The output is deterministic: re-running it reproduces the
committed files byte for byte (tests/test_experiment_configs.py checks this).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parent
ROOT = CONFIGS.parent
DEFAULT_REFERENCE = ROOT.parent / "shared" / "reference" / "clipspm_release.yaml"

METHODS = ("clipspm", "clipfsar")
DATASETS = ("kinetics", "ssv2_full", "ssv2_small", "ucf101", "hmdb51")
BACKBONES = ("RN50", "ViT-B-16")
SHOTS = (1, 3, 5)

# fsar dataset name -> key of the release's per-dataset blocks
RELEASE_KEYS = {
    "hmdb51": "hmdb",
    "ucf101": "ucf",
    "kinetics": "k100",
    "ssv2_small": "ssv2_cmn",
    "ssv2_full": "ssv2_otam",
}
# the CLIP-FSAR release's own split lists (a different store; not used by these files)
CLIPFSAR_VARIANTS = {name: f"clipfsar_{name}" for name in DATASETS}
CLIPFSAR_VARIANTS["kinetics"] = "clipfsar_kinetics100"
HEAD_FIELDS = ("mid_dim_vision", "mid_dim_text", "negative_slope", "alpha", "motion_alpha")
# SPEC 6.1: CLIP-FSAR trains with 5 queries per class; the reference YAML covers CLIP-SPM only.
CLIPFSAR_TRAIN_QUERY = 5
PRESETS = {"clipspm": "clipspm_release", "clipfsar": "clipfsar_release"}


def experiment_path(method: str, dataset: str, backbone: str, shot: int) -> str:
    """Repository-relative path of one experiment file."""
    return f"configs/experiments/{method}/{dataset}_{backbone}_{shot}shot.yaml"


def dataset_variant(dataset: str) -> str | None:
    """The split variant the shipped dataset YAML names (None when it names none)."""
    data = yaml.safe_load((CONFIGS / "datasets" / f"{dataset}.yaml").read_text()) or {}
    return (data.get("dataset") or {}).get("variant")


def experiment(
    reference: dict, method: str, dataset: str, backbone: str, shot: int
) -> dict[str, list[tuple[str, Any, str]]]:
    """Section -> [(key, value, comment)] of one experiment file, in file order."""
    key = RELEASE_KEYS[dataset]
    release = reference["datasets"][key]
    train, test, solver = release["train"], release["test"], release["solver"]
    per_step = int(reference["base_defaults"]["tasks_per_batch"])

    data = [("name", dataset, "")]
    variant = dataset_variant(dataset)
    if variant is not None:
        data.append(("variant", variant, "the CLIP-SPM release's lists"))
    sections: dict[str, list[tuple[str, Any, str]]] = {
        "dataset": data,
        "model": [("name", backbone, ""), ("pretrained", "openai", "OpenAI CLIP weights")],
    }

    head = [("name", method, "")]
    if method == "clipspm":
        for field in HEAD_FIELDS:
            value = reference["head_hyperparameters_by_dataset"][key][field]
            head.append((field, value, f"release {field} ({key})"))
    sections["head"] = head

    protocol = []
    if method == "clipspm":
        protocol.append(("train_query", int(train["query_per_class"]), "release query_per_class"))
    else:
        protocol.append(("train_query", CLIPFSAR_TRAIN_QUERY, "CLIP-FSAR release (SPEC 6.1)"))
    if dataset.startswith("ssv2"):
        # overrides the flip of the clipspm_release preset (composed before this file)
        protocol.append(("train_views", ["center"], "no flip on SSv2: left/right is in the label"))
    sections["protocol"] = protocol

    sections["episodes"] = [
        ("way", int(train["way"]), ""),
        ("shot", shot, ""),
        ("query", int(test["query_per_class"]), "release test query_per_class"),
    ]

    episodes, val_every = int(train["episodes"]), int(train["val_every"])
    sections["train"] = [
        ("lr", float(solver["LR"]), "release SOLVER.LR"),
        ("weight_decay", float(solver["WEIGHT_DECAY"]), "release SOLVER.WEIGHT_DECAY"),
        ("tasks_per_batch", per_step, "release tasks_per_batch"),
        ("seed", int(release["seed"]), "release seed"),
        ("steps", episodes // per_step, f"release {episodes} training tasks // {per_step}"),
        ("val_every", val_every // per_step, f"release every {val_every} tasks // {per_step}"),
    ]
    sections["eval"] = [("episodes", int(test["episodes"]), "release test episodes")]
    return sections


def header(method: str, dataset: str, backbone: str, shot: int) -> list[str]:
    """The comment lines above the settings: what the file is and how to run it."""
    path = experiment_path(method, dataset, backbone, shot)
    preset = f"configs/presets/{PRESETS[method]}.yaml"
    flags = f"--dataset {dataset} --model {backbone} --config {preset} --config {path}"
    title = "CLIP-SPM" if method == "clipspm" else "CLIP-FSAR"
    lines = [
        f"# {title} head, {dataset}, {backbone}, 5-way {shot}-shot; "
        f"run: fsar train {flags} --store STORE --out RUN",
        f"# store: fsar extract {flags} --out STORE (the preset sets normalisation and prompts)",
        "# Generated by configs/make_experiments.py from the CLIP-SPM release settings; "
        "edit the generator, not this file.",
    ]
    if method == "clipfsar":
        lines += [
            "# The CLIP-FSAR release's own solver values are not in the reference, so the "
            "CLIP-SPM ones are used.",
            f"# Its own split lists are dataset.variant={CLIPFSAR_VARIANTS[dataset]} "
            "(a different store).",
        ]
    return lines


def format_value(value: Any) -> str:
    """A YAML scalar or flow list that PyYAML reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        text = repr(value)
        # PyYAML reads 1e-05 (no dot) as a string, 1.0e-05 as a float
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    return str(value)


def render(method: str, dataset: str, backbone: str, shot: int, reference: dict) -> str:
    """The full text of one experiment file."""
    lines = header(method, dataset, backbone, shot)
    for section, items in experiment(reference, method, dataset, backbone, shot).items():
        lines.append(f"{section}:")
        for key, value, comment in items:
            line = f"  {key}: {format_value(value)}"
            lines.append(f"{line}  # {comment}" if comment else line)
    return "\n".join(lines) + "\n"


def write_all(reference_path: Path, out_dir: Path) -> list[Path]:
    """Write the 60 experiment files under out_dir/<method>/; returns their paths."""
    reference = yaml.safe_load(Path(reference_path).read_text())
    written = []
    for method in METHODS:
        (out_dir / method).mkdir(parents=True, exist_ok=True)
        for dataset in DATASETS:
            for backbone in BACKBONES:
                for shot in SHOTS:
                    path = out_dir / method / f"{dataset}_{backbone}_{shot}shot.yaml"
                    path.write_text(render(method, dataset, backbone, shot, reference))
                    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", nargs="?", default=str(DEFAULT_REFERENCE))
    parser.add_argument("--out", default=str(CONFIGS / "experiments"))
    args = parser.parse_args(argv)
    written = write_all(Path(args.reference), Path(args.out))
    print(f"wrote {len(written)} files under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
