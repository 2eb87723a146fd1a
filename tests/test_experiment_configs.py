"""Shipped experiment files and protocol presets: every file loads as the CLI composes it, the
CLIP-SPM / CLIP-FSAR files carry the releases' numbers (CLIP-SPM: read here from the reference
YAML, CLIP-FSAR: its split variants, normalisation and config files from golden
clipfsar_train.json, independently of the generator), and the generator reproduces the committed
files. The zoo heads' values are checked in test_zoo_experiment_configs.py."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fsar.config import Config, load_config, to_dict
from fsar.heads.registry import head_config

from .conftest import REPO

CONFIGS = REPO / "configs"
RELEASE_METHODS = ("clipspm", "clipfsar")
# the zoo heads by the data path they follow (the CLIP-FSAR codebase's, or the CLIP-SPM release's)
ZOO_CLIPFSAR = ("otam", "tsn", "crosstransformer", "trx", "hyrsm", "hyrsm_pp")
ZOO_CLIPSPM = ("sten", "cpm2c", "clipmei")
METHODS = (*RELEASE_METHODS, *ZOO_CLIPFSAR, *ZOO_CLIPSPM)
DATASETS = ("kinetics", "ssv2_full", "ssv2_small", "ucf101", "hmdb51")
BACKBONES = ("RN50", "ViT-B-16")
SHOTS = (1, 3, 5)
COMBOS = list(itertools.product(RELEASE_METHODS, DATASETS, BACKBONES, SHOTS))
ALL_COMBOS = list(itertools.product(METHODS, DATASETS, BACKBONES, SHOTS))
RELEASE_KEY = {
    "hmdb51": "hmdb",
    "ucf101": "ucf",
    "kinetics": "k100",
    "ssv2_small": "ssv2_cmn",
    "ssv2_full": "ssv2_otam",
}
PRESET_OF = {"clipspm": "clipspm_release", "clipfsar": "clipfsar_release"}
PRESET_OF |= {method: "clipfsar_release" for method in ZOO_CLIPFSAR}
PRESET_OF |= {method: "clipspm_release" for method in ZOO_CLIPSPM}
CLIPFSAR_KEY = {
    "hmdb51": "hmdb51",
    "ucf101": "ucf101",
    "kinetics": "kinetics100",
    "ssv2_small": "ssv2_small",
    "ssv2_full": "ssv2_full",
}
CLIPFSAR_VARIANT = {
    "hmdb51": "clipfsar_hmdb51",
    "ucf101": "clipfsar_ucf101",
    "kinetics": "clipfsar_kinetics100",
    "ssv2_small": "clipfsar_ssv2_small",
    "ssv2_full": "clipfsar_ssv2_full",
}
# The comparison of the release configs with CLIP-SPM's values: CLIP-FSAR's learning
# rate differs on UCF101 and SSv2, its weight decay on SSv2-Full and Kinetics-100.
LR_DIFFERS = {"ucf101", "ssv2_full", "ssv2_small"}
WD_DIFFERS = {"ssv2_full", "kinetics"}


@pytest.fixture(scope="module")
def reference(shared) -> dict:
    return yaml.safe_load((shared / "reference" / "clipspm_release.yaml").read_text())


@pytest.fixture(scope="module")
def clipfsar_train(shared) -> dict:
    path = shared / "golden" / "data_path" / "clipfsar_train.json"
    return json.loads(path.read_text())


def experiment_file(method: str, dataset: str, backbone: str, shot: int) -> Path:
    return CONFIGS / "experiments" / method / f"{dataset}_{backbone}_{shot}shot.yaml"


def compose(dataset: str, backbone: str, *extra: Path) -> Config:
    """As `fsar ... --dataset D --model M --config X ...` composes: dataset, model, then files."""
    files = [CONFIGS / "datasets" / f"{dataset}.yaml", CONFIGS / "models" / f"{backbone}.yaml"]
    return load_config([*files, *extra])


def test_every_head_has_its_thirty_experiment_files_and_no_others():
    expected = {experiment_file(*combo) for combo in ALL_COMBOS}
    assert len(expected) == 11 * 30
    assert all(path.is_file() for path in expected)
    assert set((CONFIGS / "experiments").glob("*/*.yaml")) == expected


@pytest.mark.parametrize("method, dataset, backbone, shot", ALL_COMBOS)
def test_every_experiment_file_loads_with_its_preset(method, dataset, backbone, shot):
    preset = CONFIGS / "presets" / f"{PRESET_OF[method]}.yaml"
    path = experiment_file(method, dataset, backbone, shot)
    config = compose(dataset, backbone, preset, path)
    text = path.read_text()
    assert f"--config configs/presets/{PRESET_OF[method]}.yaml" in text.splitlines()[0]
    assert config.head.name == method and config.protocol.preset == PRESET_OF[method]
    assert (config.dataset.name, config.model.name, config.model.pretrained) == (
        dataset,
        backbone,
        "openai",
    )
    assert (config.episodes.way, config.episodes.shot, config.episodes.query) == (5, shot, 1)
    assert config.train.tasks_per_batch % config.train.episode_batch == 0
    assert set(config.protocol.train_views) <= set(config.extract.views)
    if dataset.startswith("ssv2"):
        assert config.protocol.train_views == ["center"]


@pytest.mark.parametrize("method, dataset, backbone, shot", COMBOS)
def test_experiment_composes_with_its_preset_and_carries_the_release_values(
    reference, clipfsar_train, method, dataset, backbone, shot
):
    preset = CONFIGS / "presets" / f"{PRESET_OF[method]}.yaml"
    path = experiment_file(method, dataset, backbone, shot)
    config = compose(dataset, backbone, preset, path)
    release = reference["datasets"][RELEASE_KEY[dataset]]
    per_step = reference["base_defaults"]["tasks_per_batch"]
    shipped = yaml.safe_load((CONFIGS / "datasets" / f"{dataset}.yaml").read_text())
    text = path.read_text()

    assert text.startswith(f"# {'CLIP-SPM' if method == 'clipspm' else 'CLIP-FSAR'}")
    assert f"fsar train --dataset {dataset} --model {backbone}" in text
    assert config.dataset.name == dataset
    assert (config.model.name, config.model.pretrained) == (backbone, "openai")
    assert config.head.name == method
    assert config.protocol.preset == PRESET_OF[method]
    assert (config.episodes.way, config.episodes.shot) == (release["train"]["way"], shot)
    assert config.episodes.query == release["test"]["query_per_class"] == 1
    assert config.eval.episodes == release["test"]["episodes"] == 10000
    assert config.train.val_episodes == 10000  # both releases validate on 10,000 test episodes
    assert config.train.tasks_per_batch % config.train.episode_batch == 0

    if method == "clipspm":
        for field in ("mid_dim_vision", "mid_dim_text", "negative_slope", "alpha", "motion_alpha"):
            value = reference["head_hyperparameters_by_dataset"][RELEASE_KEY[dataset]][field]
            assert getattr(config.head, field) == value, field
    else:  # the reference says nothing about CLIP-FSAR's head: its defaults, with merge-before
        assert to_dict(config.head) == to_dict(head_config("clipfsar", merge_before=True))

    if method == "clipspm":
        assert config.dataset.variant == shipped["dataset"]["variant"]
        assert config.train.lr == float(release["solver"]["LR"])
        assert config.train.weight_decay == float(release["solver"]["WEIGHT_DECAY"])
        assert config.train.tasks_per_batch == per_step == 16
        assert config.train.seed == release["seed"] == 6
        assert config.train.steps == release["train"]["episodes"] // per_step
        assert config.train.val_every == release["train"]["val_every"] // per_step
        assert config.protocol.train_query == release["train"]["query_per_class"] == 4
        assert (config.extract.mean, config.extract.std) == (None, None)
    else:
        # the release's own lists (67,013 SSv2-Full training videos, not CLIP-SPM's 77,500)
        assert config.dataset.variant == CLIPFSAR_VARIANT[dataset]
        assert config.train.tasks_per_batch == 4  # release TRAIN.BATCH_SIZE
        assert (config.train.lr != float(release["solver"]["LR"])) == (dataset in LR_DIFFERS)
        differs = config.train.weight_decay != float(release["solver"]["WEIGHT_DECAY"])
        assert differs == (dataset in WD_DIFFERS)
        assert config.protocol.train_query == 5
        assert config.protocol.train_shot == 1 and config.head.merge_before is True
        # the file names the release config it follows; normalisation as that config resolved
        key = f"{CLIPFSAR_KEY[dataset]}_{5 if shot == 5 else 1}shot"
        resolved = clipfsar_train["per_config"][key]
        assert resolved["config_file"] in text and "clipfsar_train.json" in text
        mean = config.extract.mean or [0.48145466, 0.4578275, 0.40821073]
        std = config.extract.std or [0.26862954, 0.26130258, 0.27577711]
        assert mean == resolved["transforms"]["MEAN"] and std == resolved["transforms"]["STD"]
        assert (config.extract.mean is not None) == (key == "ucf101_5shot")

    # training views must be cached by the dataset's store; SSv2 is never flipped
    assert set(config.protocol.train_views) <= set(config.extract.views)
    if dataset.startswith("ssv2"):
        assert config.protocol.train_views == ["center"]
    elif method == "clipspm":
        assert config.protocol.train_views == ["center", "flip"]


@pytest.mark.parametrize("method, dataset, backbone, shot", ALL_COMBOS[::7])
def test_experiment_loads_without_a_preset(method, dataset, backbone, shot):
    config = compose(dataset, backbone, experiment_file(method, dataset, backbone, shot))
    assert config.protocol.preset == "fsar"
    assert config.episodes.shot == shot and config.head.name == method


def test_release_presets_state_the_spec_protocol():
    spm = compose("hmdb51", "RN50", CONFIGS / "presets" / "clipspm_release.yaml")
    assert spm.protocol.preset == "clipspm_release"
    assert spm.protocol.selection_split == "test"
    assert spm.protocol.test_frames == "clipspm_test"
    assert spm.protocol.train_frames == "clipspm_train"
    assert spm.extract.frames.startswith("dense")
    assert spm.protocol.train_shot is None
    assert spm.protocol.train_query == 4
    assert spm.protocol.train_views == ["center", "flip"]
    assert (spm.extract.normalize, spm.extract.prompts) == (False, "clipspm16")
    assert (spm.extract.interpolation, spm.extract.resize_mode) == ("pil_bilinear", "short_side")
    assert (spm.extract.crop_offset, spm.extract.frame_listing) == ("round_half_even", "sorted_all")
    assert (spm.extract.precision, spm.extract.feature_dtype) == ("fp32", "float32")
    assert spm.train.val_episodes == 10000

    fsar = compose("hmdb51", "RN50", CONFIGS / "presets" / "clipfsar_release.yaml")
    assert fsar.protocol.preset == "clipfsar_release"
    assert fsar.protocol.selection_split == "test"
    assert fsar.protocol.test_frames == "clipfsar_test"
    assert fsar.protocol.train_frames == "clipfsar_train"
    assert fsar.extract.frames.startswith("dense")
    assert fsar.protocol.train_shot == 1  # the clipfsar files add head.merge_before
    assert fsar.protocol.train_query == 5
    assert (fsar.extract.normalize, fsar.extract.prompts) == (True, "single")
    assert (fsar.extract.interpolation, fsar.extract.resize_mode) == ("bilinear_float", "squash")
    assert fsar.extract.crop_offset == "floor"
    assert (fsar.extract.precision, fsar.extract.feature_dtype) == ("fp32", "float32")
    assert fsar.train.val_episodes == 10000


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested mapping -> {dotted key: value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_fsar_preset_is_the_schema_defaults_and_covers_every_release_preset_key():
    presets = {
        name: leaves(yaml.safe_load((CONFIGS / "presets" / f"{name}.yaml").read_text()))
        for name in ("fsar", "clipspm_release", "clipfsar_release")
    }
    defaults = leaves(to_dict(load_config([])))
    for key, value in presets["fsar"].items():
        assert defaults[key] == value, key
    # head options belong to one head: a preset composes with any head's experiment file
    assert not any(key.startswith("head.") for preset in presets.values() for key in preset)
    assert set(presets["clipspm_release"]) <= set(presets["fsar"])
    assert set(presets["clipfsar_release"]) <= set(presets["fsar"])
    # composing fsar.yaml after a release preset restores every default it changed
    undone = load_config(
        [CONFIGS / "presets" / "clipfsar_release.yaml", CONFIGS / "presets" / "fsar.yaml"]
    )
    assert to_dict(undone) == to_dict(load_config([]))


def test_generator_reproduces_the_committed_files_byte_for_byte(shared, tmp_path):
    reference = shared / "reference" / "clipspm_release.yaml"
    subprocess.run(
        [
            sys.executable,
            str(CONFIGS / "make_experiments.py"),
            str(reference),
            "--clipfsar-train",
            str(shared / "golden" / "data_path" / "clipfsar_train.json"),
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*/*.yaml"))
    assert len(generated) == 11 * 30
    for relative in generated:
        committed = CONFIGS / "experiments" / relative
        assert (tmp_path / relative).read_bytes() == committed.read_bytes(), relative
