"""Write configs/experiments/<head>/<dataset>_<backbone>_<K>shot.yaml from the releases'
settings, so every number in them has one stated source: CLIP-SPM and CLIP-FSAR here, the zoo
heads of other releases from configs/zoo_experiments.py (their values and what they leave at
fsar's defaults).

    python configs/make_experiments.py [REFERENCE_YAML] [--clipfsar-train JSON] [--out DIR]

REFERENCE_YAML (the CLIP-SPM release settings) defaults to
../shared/reference/clipspm_release.yaml beside the repository; JSON (the CLIP-FSAR release's
resolved configs, golden data_path/clipfsar_train.json) to ../shared/golden/data_path/; DIR to
configs/experiments. The output is deterministic: re-running it reproduces the committed files
byte for byte (tests/test_experiment_configs.py checks this).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

import yaml
from zoo_experiments import HEADS as ZOO
from zoo_experiments import Item, zoo_notes, zoo_options

CONFIGS = Path(__file__).resolve().parent
ROOT = CONFIGS.parent
DEFAULT_REFERENCE = ROOT.parent / "shared" / "reference" / "clipspm_release.yaml"
DEFAULT_CLIPFSAR_TRAIN = ROOT.parent / "shared" / "golden" / "data_path" / "clipfsar_train.json"

METHODS = ("clipspm", "clipfsar", *ZOO)
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
# the CLIP-FSAR release's own split lists (`fsar splits list`: the clipfsar_* variants)
CLIPFSAR_VARIANTS = {name: f"clipfsar_{name}" for name in DATASETS}
CLIPFSAR_VARIANTS["kinetics"] = "clipfsar_kinetics100"
# fsar dataset name -> key prefix of clipfsar_train.json's per_config entries
CLIPFSAR_KEYS = {name: name for name in DATASETS}
CLIPFSAR_KEYS["kinetics"] = "kinetics100"
HEAD_FIELDS = ("mid_dim_vision", "mid_dim_text", "negative_slope", "alpha", "motion_alpha")
# SPEC 6.1: CLIP-FSAR trains with 5 queries per class; the reference YAML covers CLIP-SPM only.
CLIPFSAR_TRAIN_QUERY = 5
# The CLIP-FSAR release's SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY per dataset, the same in its
# 1-shot and 5-shot configs (the files clipfsar_train.json names under per_config.config_file).
# clipfsar_train.json does not carry solver values: these were read from those files in the
# public alibaba-mmai-research/CLIP-FSAR repository (commit 460aee45). fsar keeps one constant
# learning rate; the release warms up for one epoch and then decays it in steps (LRS 1, 0.1, 0.01).
CLIPFSAR_SOLVER = {
    "hmdb51": (1e-05, 5e-05),
    "ucf101": (2e-06, 5e-05),
    "kinetics": (1e-05, 5e-04),
    "ssv2_full": (5e-05, 5e-05),
    "ssv2_small": (5e-05, 5e-05),
}
CLIPFSAR_TASKS_PER_STEP = 4  # the release's TRAIN.BATCH_SIZE: one task per GPU on 4 GPUs
CLIPFSAR_TEST_EPISODES = 10000  # the release's TRAIN.NUM_TEST_TASKS
FAMILY = {"clipspm": "clipspm", "clipfsar": "clipfsar"} | {m: h.family for m, h in ZOO.items()}
PRESETS = {"clipspm": "clipspm_release", "clipfsar": "clipfsar_release"}
# open_clip's OPENAI_DATASET_MEAN / STD (fsar.data.transforms.CLIP_MEAN / CLIP_STD): the
# normalisation of the clipfsar_release preset, which a file only overrides when it differs
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SECTION_ORDER = ("dataset", "model", "head", "protocol", "episodes", "train", "eval", "extract")
# overrides the flip of the clipspm_release preset (composed before the file)
SSV2_VIEWS = ("train_views", ["center"], "no flip on SSv2: left/right is in the label")


def experiment_path(method: str, dataset: str, backbone: str, shot: int) -> str:
    """Repository-relative path of one experiment file."""
    return f"configs/experiments/{method}/{dataset}_{backbone}_{shot}shot.yaml"


def dataset_variant(dataset: str) -> str | None:
    """The split variant the shipped dataset YAML names (None when it names none)."""
    data = yaml.safe_load((CONFIGS / "datasets" / f"{dataset}.yaml").read_text()) or {}
    return (data.get("dataset") or {}).get("variant")


def clipfsar_config(clipfsar_train: dict, dataset: str, shot: int) -> tuple[str, dict]:
    """(key, resolved config) of the CLIP-FSAR release config behind a K-shot file: its 5-shot
    config for K = 5, else its 1-shot one (the release ships no 3-shot config)."""
    key = f"{CLIPFSAR_KEYS[dataset]}_{5 if shot == 5 else 1}shot"
    return key, clipfsar_train["per_config"][key]


def clipfsar_experiment(
    clipfsar_train: dict, dataset: str, backbone: str, shot: int
) -> dict[str, list[Item]]:
    """Section -> [(key, value, comment)] of one CLIP-FSAR experiment file, in file order."""
    lr, weight_decay = CLIPFSAR_SOLVER[dataset]
    head = [
        ("name", "clipfsar", ""),
        ("merge_before", True, "with the preset's 1-shot training (SPEC 6.1)"),
    ]
    protocol = [("train_query", CLIPFSAR_TRAIN_QUERY, "CLIP-FSAR release (SPEC 6.1)")]
    train = [
        ("lr", lr, "release SOLVER.BASE_LR (constant here; see the header)"),
        ("weight_decay", weight_decay, "release SOLVER.WEIGHT_DECAY"),
        ("tasks_per_batch", CLIPFSAR_TASKS_PER_STEP, "release TRAIN.BATCH_SIZE"),
    ]
    sections = clipfsar_data_path(clipfsar_train, dataset, backbone, shot, head, protocol, train)
    sections["eval"] = [("episodes", CLIPFSAR_TEST_EPISODES, "release NUM_TEST_TASKS")]
    return sections


def clipfsar_data_path(
    clipfsar_train: dict,
    dataset: str,
    backbone: str,
    shot: int,
    head: list[Item],
    protocol: list[Item],
    train: list[Item],
) -> dict[str, list[Item]]:
    """The sections of a file on the CLIP-FSAR codebase's data path (its split lists and the
    normalisation its K-shot config resolves to) around the given head, protocol and train."""
    key, release = clipfsar_config(clipfsar_train, dataset, shot)
    sections: dict[str, list[Item]] = {
        "dataset": [
            ("name", dataset, ""),
            ("variant", CLIPFSAR_VARIANTS[dataset], "the CLIP-FSAR release's lists"),
        ],
        "model": [("name", backbone, ""), ("pretrained", "openai", "OpenAI CLIP weights")],
        "head": head,
    }
    if dataset.startswith("ssv2"):
        protocol = [*protocol, SSV2_VIEWS]
    if protocol:
        sections["protocol"] = protocol
    sections["episodes"] = [("way", 5, ""), ("shot", shot, ""), ("query", 1, "")]
    per_step = next(value for name, value, _ in train if name == "tasks_per_batch")
    batch = ("episode_batch", per_step, "episodes per forward pass (divides the above)")
    sections["train"] = [*train, batch]
    transforms = release["transforms"]
    mean, std = [float(v) for v in transforms["MEAN"]], [float(v) for v in transforms["STD"]]
    if (tuple(mean), tuple(std)) != (CLIP_MEAN, CLIP_STD):
        sections["extract"] = [
            ("mean", mean, f"{key}: the base DATA.MEAN, not CLIP's (clipfsar_train.json)"),
            ("std", std, f"{key}: the base DATA.STD"),
        ]
    return sections


def zoo_experiment(
    reference: dict, clipfsar_train: dict, method: str, dataset: str, backbone: str, shot: int
) -> dict[str, list[Item]]:
    """Section -> [(key, value, comment)] of one zoo head's file: its family's data path and
    loop settings (as far as the shared sources give them) around its own options."""
    spec = ZOO[method]
    key = RELEASE_KEYS[dataset]
    options, _ = zoo_options(reference, method, dataset, shot, key)
    head = [("name", method, ""), *options]
    if spec.family == "clipfsar":
        # the preset's 1-shot training goes with CLIP-FSAR's merge-before (see the header)
        protocol = [("train_shot", None, "K-shot training, fsar's default (see the header)")]
        train = [("tasks_per_batch", CLIPFSAR_TASKS_PER_STEP, "TRAIN.BATCH_SIZE (zoo README)")]
        return clipfsar_data_path(clipfsar_train, dataset, backbone, shot, head, protocol, train)

    base = reference["base_defaults"]
    data = [("name", dataset, "")]
    variant = dataset_variant(dataset)
    if variant is not None:
        data.append(("variant", variant, "the CLIP-SPM release's lists"))
    sections: dict[str, list[Item]] = {
        "dataset": data,
        "model": [("name", backbone, ""), ("pretrained", "openai", "OpenAI CLIP weights")],
        "head": head,
    }
    if dataset.startswith("ssv2"):
        sections["protocol"] = [SSV2_VIEWS]
    sections["episodes"] = [("way", 5, ""), ("shot", shot, ""), ("query", 1, "")]
    # TASKS_PER_BATCH is 16 in CLIP-SPM's and CLIP-MEI's configs/base.yaml (zoo README)
    per_step = int(base["tasks_per_batch"])
    train = [("tasks_per_batch", per_step, "TASKS_PER_BATCH of configs/base.yaml (zoo README)")]
    if dataset in spec.amp:
        train.append(("bf16", True, f"the release's {key} config sets USE_AMP (zoo README)"))
    sections["train"] = train
    if spec.spm_base:
        test_episodes = int(base["test_episodes"])
        sections["eval"] = [("episodes", test_episodes, "release base test_episodes")]
    if spec.prompts is not None:
        sections["extract"] = [("prompts", spec.prompts, "'a photo of {}' (zoo README)")]
    return sections


def experiment(
    reference: dict, dataset: str, backbone: str, shot: int
) -> dict[str, list[tuple[str, Any, str]]]:
    """Section -> [(key, value, comment)] of one CLIP-SPM experiment file, in file order."""
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

    head = [("name", "clipspm", "")]
    for field in HEAD_FIELDS:
        value = reference["head_hyperparameters_by_dataset"][key][field]
        head.append((field, value, f"release {field} ({key})"))
    sections["head"] = head

    protocol = [("train_query", int(train["query_per_class"]), "release query_per_class")]
    if dataset.startswith("ssv2"):
        protocol.append(SSV2_VIEWS)
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


def header(
    method: str, dataset: str, backbone: str, shot: int, reference: dict, clipfsar_train: dict
) -> list[str]:
    """The comment lines above the settings: what the file is, how to run it, where from."""
    path = experiment_path(method, dataset, backbone, shot)
    preset = f"configs/presets/{PRESETS[FAMILY[method]]}.yaml"
    flags = f"--dataset {dataset} --model {backbone} --config {preset} --config {path}"
    store_note = "the preset sets the pixel rules and prompts"
    if method in ZOO:
        title = f"{ZOO[method].title} head ({ZOO[method].release})"
        if ZOO[method].prompts is not None:
            store_note = "the preset sets the pixel rules, this file the prompts"
    else:
        title = "CLIP-SPM head" if method == "clipspm" else "CLIP-FSAR head"
    lines = [
        f"# {title}, {dataset}, {backbone}, 5-way {shot}-shot; "
        f"run: fsar train {flags} --store STORE --out RUN",
        f"# store: fsar extract {flags} --out STORE ({store_note})",
    ]
    if method == "clipspm":
        return lines + [
            "# Generated by configs/make_experiments.py from the CLIP-SPM release settings; "
            "edit the generator, not this file."
        ]
    if method in ZOO:
        return lines + zoo_header(method, dataset, shot, reference, clipfsar_train)
    key, release = clipfsar_config(clipfsar_train, dataset, shot)
    lines += [
        "# Generated by configs/make_experiments.py; edit the generator, not this file. Release "
        f"config: {release['config_file']}",
        f"# (golden data_path/clipfsar_train.json per_config.{key}, which lists the configs the "
        "release read; its normalisation comes from there).",
        "# Its solver values are not in the shared folder: lr and weight decay were read from "
        "that file in the public release",
        "# (commit 460aee45). The release warms the lr up for one epoch, then decays it x0.1 "
        "twice; fsar keeps it constant.",
        "# train.steps / val_every are not derived (the release counts epochs of "
        "NUM_TRAIN_TASKS): set them for a run.",
    ]
    if shot not in (1, 5):
        lines.append("# The release ships no 3-shot config: this file follows its 1-shot one.")
    return lines


def zoo_header(
    method: str, dataset: str, shot: int, reference: dict, clipfsar_train: dict
) -> list[str]:
    """A zoo file's sources, its widths per backbone, and what it leaves at fsar's defaults."""
    source = None
    if ZOO[method].family == "clipfsar":
        config_key, release = clipfsar_config(clipfsar_train, dataset, shot)
        source = (release["config_file"], config_key)
    key = RELEASE_KEYS[dataset]
    lines = []
    for text in zoo_notes(reference, method, dataset, shot, key, source):
        lines += textwrap.wrap(
            text, 98, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
        )
    return lines


def format_value(value: Any) -> str:
    """A YAML scalar, flow list or flow mapping that PyYAML reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        text = repr(value)
        # PyYAML reads 1e-05 (no dot) as a string, 1.0e-05 as a float
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    return str(value)


def render(
    method: str, dataset: str, backbone: str, shot: int, reference: dict, clipfsar_train: dict
) -> str:
    """The full text of one experiment file."""
    lines = header(method, dataset, backbone, shot, reference, clipfsar_train)
    if method == "clipspm":
        sections = experiment(reference, dataset, backbone, shot)
    elif method == "clipfsar":
        sections = clipfsar_experiment(clipfsar_train, dataset, backbone, shot)
    else:
        sections = zoo_experiment(reference, clipfsar_train, method, dataset, backbone, shot)
    for section in sorted(sections, key=SECTION_ORDER.index):
        items = sections[section]
        lines.append(f"{section}:")
        for key, value, comment in items:
            line = f"  {key}: {format_value(value)}"
            lines.append(f"{line}  # {comment}" if comment else line)
    return "\n".join(lines) + "\n"


def write_all(reference_path: Path, out_dir: Path, clipfsar_train_path: Path) -> list[Path]:
    """Write every experiment file under out_dir/<method>/; returns their paths."""
    reference = yaml.safe_load(Path(reference_path).read_text())
    clipfsar_train = json.loads(Path(clipfsar_train_path).read_text())
    written = []
    for method in METHODS:
        (out_dir / method).mkdir(parents=True, exist_ok=True)
        for dataset in DATASETS:
            for backbone in BACKBONES:
                for shot in SHOTS:
                    path = out_dir / method / f"{dataset}_{backbone}_{shot}shot.yaml"
                    text = render(method, dataset, backbone, shot, reference, clipfsar_train)
                    path.write_text(text)
                    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", nargs="?", default=str(DEFAULT_REFERENCE))
    parser.add_argument("--clipfsar-train", default=str(DEFAULT_CLIPFSAR_TRAIN))
    parser.add_argument("--out", default=str(CONFIGS / "experiments"))
    args = parser.parse_args(argv)
    written = write_all(Path(args.reference), Path(args.out), Path(args.clipfsar_train))
    print(f"wrote {len(written)} files under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
