"""The zoo heads' experiment files carry what the shared sources give, read here from the golden
zoo jsons (cfg and the release lines they patched), the zoo README and the reference YAML,
independently of the generator; everything else stays at fsar's defaults and the file's header
names it; and every file's head builds and runs at its backbone's width."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re

import pytest
import torch
import yaml

from fsar.config import Config, load_config, to_dict
from fsar.heads.registry import build_head, head_config, head_spec
from fsar.heads.spec import BuildContext, HeadConfig

from .conftest import REPO
from .test_experiment_configs import (
    BACKBONES,
    CLIPFSAR_VARIANT,
    DATASETS,
    RELEASE_KEY,
    SHOTS,
    ZOO_CLIPFSAR,
    ZOO_CLIPSPM,
)

CONFIGS = REPO / "configs"
ZOO = (*ZOO_CLIPFSAR, *ZOO_CLIPSPM)
COMBOS = list(itertools.product(ZOO, DATASETS, BACKBONES, SHOTS))
SSV2 = ("ssv2_full", "ssv2_small")
WIDTH = {"RN50": 1024, "ViT-B-16": 512}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def sources(shared) -> dict:
    zoo = shared / "golden" / "zoo"
    return {
        "reference": yaml.safe_load((shared / "reference" / "clipspm_release.yaml").read_text()),
        "clipfsar_train": json.loads(
            (shared / "golden" / "data_path" / "clipfsar_train.json").read_text()
        ),
        "readme": " ".join((zoo / "README.md").read_text().split()),  # one line
        "json": {path.stem: json.loads(path.read_text()) for path in zoo.glob("*.json")},
    }


def patched(settings: dict, pattern: str) -> str | tuple[str, ...]:
    """The groups of the one match of `pattern` in the release lines a golden file replaced."""
    matches = [re.search(pattern, patch["replace"]) for patch in settings["source_patches"]]
    found = [m.groups() for m in matches if m]
    assert len(found) == 1, (pattern, found)
    return found[0][0] if len(found[0]) == 1 else found[0]


@functools.cache
def load(method: str, dataset: str, backbone: str, shot: int) -> tuple[Config, dict, str]:
    """(config as composed with its preset, the file's own head section, its header); cached,
    so tests only read it."""
    path = CONFIGS / "experiments" / method / f"{dataset}_{backbone}_{shot}shot.yaml"
    preset = "clipfsar_release" if method in ZOO_CLIPFSAR else "clipspm_release"
    files = [
        CONFIGS / "datasets" / f"{dataset}.yaml",
        CONFIGS / "models" / f"{backbone}.yaml",
        CONFIGS / "presets" / f"{preset}.yaml",
        path,
    ]
    text = path.read_text()
    header = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    return load_config(files), yaml.safe_load(text)["head"], header


@pytest.mark.parametrize("method, dataset, backbone, shot", COMBOS)
def test_zoo_file_follows_its_family_and_leaves_the_rest_at_fsar_defaults(
    sources, method, dataset, backbone, shot
):
    config, head, header = load(method, dataset, backbone, shot)
    defaults = Config()
    for key in ("lr", "weight_decay", "seed", "steps", "val_every"):  # no shared source
        assert getattr(config.train, key) == getattr(defaults.train, key), key
        assert f"train.{key}" in header
    assert config.train.val_episodes == 10000  # both presets
    if method in ZOO_CLIPFSAR:
        assert config.protocol.preset == "clipfsar_release"
        assert config.dataset.variant == CLIPFSAR_VARIANT[dataset]
        assert config.train.tasks_per_batch == config.train.episode_batch == 4
        assert "BATCH_SIZE` (= number of GPUs, 4 in the configs)" in sources["readme"]
        assert config.protocol.train_query == 5  # the preset's
        assert config.protocol.train_shot is None and "protocol.train_shot" in header
        key = f"{'kinetics100' if dataset == 'kinetics' else dataset}_{5 if shot == 5 else 1}shot"
        resolved = sources["clipfsar_train"]["per_config"][key]
        assert resolved["config_file"] in "".join(header.split())
        assert (config.extract.mean or CLIP_MEAN) == resolved["transforms"]["MEAN"]
        assert (config.extract.std or CLIP_STD) == resolved["transforms"]["STD"]
        assert config.extract.prompts == "single"  # the preset's
    else:
        shipped = yaml.safe_load((CONFIGS / "datasets" / f"{dataset}.yaml").read_text())
        base = sources["reference"]["base_defaults"]
        assert config.protocol.preset == "clipspm_release"
        assert config.dataset.variant == shipped["dataset"]["variant"]
        assert config.train.tasks_per_batch == base["tasks_per_batch"] == 16
        assert "(16 in configs/base.yaml)" in sources["readme"]  # CLIP-SPM's and CLIP-MEI's
        assert config.eval.episodes == base["test_episodes"]
        assert config.protocol.train_query == 4 and config.protocol.train_shot is None
        assert (config.extract.mean, config.extract.std, config.extract.normalize) == (
            None,
            None,
            False,
        )
        # STEN and CLIP-MEI embed the class names with one prompt, CPM2C with the 16 templates
        single = method in ("sten", "clipmei")
        assert config.extract.prompts == ("single" if single else "clipspm16")
        if single:
            title = "STEN" if method == "sten" else "CLIP-MEI"
            section = sources["readme"].split(f"## {title} (")[1].split(" ## ")[0]
            assert 'prompt "a photo of {}"' in section
        amp = method == "clipmei" and dataset == "ssv2_full"
        assert config.train.bf16 is True and ("train.bf16" in header) == (
            method == "clipmei" and not amp
        )


@pytest.mark.parametrize("method, dataset, backbone, shot", COMBOS)
def test_zoo_file_names_every_option_it_leaves_at_the_default(method, dataset, backbone, shot):
    config, head, header = load(method, dataset, backbone, shot)
    shared = {f.name for f in dataclasses.fields(HeadConfig)}
    own = [f.name for f in dataclasses.fields(head_spec(method).config) if f.name not in shared]
    defaults = to_dict(head_config(method))
    for name in own:
        if name not in head:
            assert f"head.{name}" in header, name
            assert getattr(config.head, name) == defaults[name], name
    if head_spec(method).aux_weights and "aux_weights" not in head:
        assert "head.aux_weights" in header and config.head.aux_weights == {}


@pytest.mark.parametrize("dataset, shot", list(itertools.product(DATASETS, SHOTS)))
def test_alibaba_heads_carry_the_release_values(sources, dataset, shot):
    js, readme = sources["json"], sources["readme"]

    otam = load("otam", dataset, "RN50", shot)[0].head
    assert (otam.bidirectional, otam.prototype) == (True, False)
    assert otam.lam == js["otam_5w1s"]["otam_lambda"] == 0.1

    cross = load("crosstransformer", dataset, "RN50", shot)[0].head
    assert cross.hidden == int(patched(js["crosstransformer_5w3s"], r"self\.hidden_dim = (\d+)"))
    assert cross.logit_divisor == 8.0 and "(8 hard-coded" in readme

    trx = load("trx", dataset, "ViT-B-16", shot)[0].head
    assert trx.out_dim == int(patched(js["trx_5w1s"], r"trans_linear_out_dim = (\d+)"))
    assert trx.temporal_set == json.loads(patched(js["trx1_5w2s"], r"temp_set = (\[.*\])"))
    assert trx.dropout == js["trx_5w1s"]["trans_dropout"]
    assert trx.position_scale == js["trx_5w1s"]["pe_scale_factor"]
    assert trx.max_len is None and "int(1.5·T)" in readme

    for method in ("hyrsm", "hyrsm_pp"):
        head = load(method, dataset, "RN50", shot)[0].head
        assert head.set_members == ("videos" if shot == 1 else "prototypes")
        assert (head.mid_dim, head.heads) == (None, 8)
        prefix = "hyrsm" if method == "hyrsm" else "hyrsmpp"
        cfg = js[f"{prefix}1shot_5w1s"]["cfg"]["TRAIN"]
        if dataset in SSV2:
            assert head.aux_weights["frame_class"] == cfg["USE_CLASSIFICATION_VALUE"]
        else:  # 0.4 or 0.15 in the release, which one is not in the shared folder
            assert head.aux_weights == {}
        if method == "hyrsm_pp" and dataset in SSV2:
            assert head.position_a == cfg["POSITION_A"] and head.position_b == cfg["POSITION_B"]
            assert head.window_size == cfg["WINDOW_SIZE"]
            assert head.temporal_balance == cfg["TEMPORAL_BALANCE"]
            assert head.balance_coefficient == cfg["BALANCE_COEFFICIENT"]
            assert head.aux_weights["temporal_regular"] == cfg["TEMPORAL_LOSS_WEIGHT"]


@pytest.mark.parametrize("dataset, shot", list(itertools.product(DATASETS, SHOTS)))
def test_clipspm_release_heads_carry_the_release_values(sources, dataset, shot):
    js, readme = sources["json"], sources["readme"]
    params = sources["reference"]["head_hyperparameters_by_dataset"][RELEASE_KEY[dataset]]

    cpm2c = load("cpm2c", dataset, "RN50", shot)[0].head
    cfg = js["cpm2c_5w1s"]["cfg"]["MODEL"]
    for name in ("mid_dim_vision", "mid_dim_text", "negative_slope", "alpha"):
        assert getattr(cpm2c, name) == params[name], name
    assert (cpm2c.heads, cpm2c.dim_head, cpm2c.mlp_dim) == (8, None, 2048)
    assert "dim_head_k=self.mid_dim // 8" in patched(js["cpm2c_5w1s"], r"(dim_head_k=.*)")
    assert "FFN 128 (release default 2048)" in readme
    assert cpm2c.attn_dropout == float(patched(js["cpm2c_5w1s"], r"dropout_atte=([\d.]+)"))
    lmd = cfg["LMD"]
    assert (cpm2c.local_weight, cpm2c.global_weight) == (lmd[1], lmd[2])
    weights = {"classification": lmd[0], "local": lmd[1], "global": lmd[2], "consistency": 0.001}
    assert cpm2c.aux_weights == weights and "0.001·consistency" in readme
    if dataset == "ssv2_full":  # the golden cfg is ssv2_otam.yaml's
        assert (cpm2c.normal_coff, cpm2c.motion_coff) == (cfg["NORMAL_COFF"], cfg["MOTION_COFF"])
    elif dataset == "ucf101":
        assert cpm2c.motion_coff == 0.0 and "ucf.yaml uses 0" in readme
    else:
        assert (cpm2c.normal_coff, cpm2c.motion_coff) == (1.0, 1.0)  # fsar's, not derived

    mei = load("clipmei", dataset, "RN50", shot)[0].head
    settings = js["clipmei_5w1s"]
    assert mei.dim_head == int(patched(settings, r"dim_head_k=(\d+)"))
    assert mei.attn_dropout == float(patched(settings, r"dropout_atte=([\d.]+)"))
    hidden, dropout = patched(settings, r"FeedForward\(dim, (\d+), dropout=([\d.]+)\)")
    assert (mei.prompt_hidden, mei.ffn_dropout) == (int(hidden), float(dropout))
    assert (mei.heads, mei.mlp_dim, mei.fusion_weight) == (8, 2048, 0.1)
    assert (mei.class_distance_weight, mei.otam_lambda) == (0.5, 0.5)
    assert mei.aux_weights == dict.fromkeys(
        ("consistency", "text_distance", "motion_consistency"), 0.001
    )
    assert "0.001·dists" in readme and "−(0.5·class_dists_l + task)" in readme


@pytest.mark.parametrize("method, backbone", list(itertools.product(ZOO, BACKBONES)))
def test_zoo_file_builds_its_head_at_the_backbone_width(method, backbone):
    config = load(method, "hmdb51", backbone, 5)[0]
    torch.manual_seed(0)
    head = build_head(config.head, BuildContext(WIDTH[backbone], {}, num_train_classes=31))
    head.eval()
    way, shot, frames, dim = 5, 5, 8, WIDTH[backbone]
    labels = torch.arange(way).repeat_interleave(shot)[None]
    with torch.no_grad():
        out = head(
            torch.randn(1, way * shot, frames, dim),
            labels,
            torch.randn(1, way, frames, dim),
            torch.randn(1, way, dim),
        )
    assert out.logits.shape == (1, way, way) and torch.isfinite(out.logits).all()
