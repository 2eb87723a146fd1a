"""The head registry in use (issue 13): typed per-head options, every head through the CLI,
a method comparison by ablation, and checkpoints written before the registry.

One module-scoped store of rendered demo videos serves the CLI tests; every registered head
trains two steps, resumes to three, and is scored on the same 40 test episodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fsar.cli import main
from fsar.config import ConfigError, load_config, upgrade_config_dict, with_overrides
from fsar.data.synthetic import DemoSpec, render_demo_dataset
from fsar.heads import HEADS
from fsar.pipelines.checkpoint import load_checkpoint

from .test_pipelines import extract_store

RUN = [
    "train.tasks_per_batch=2",
    "train.episode_batch=2",
    "train.val_every=1",
    "train.val_episodes=10",
    "train.log_every=1",
    "train.lr=1e-3",
    "eval.episodes=40",
    "eval.episode_batch=20",
    "--device",
    "cpu",
    "--way",
    "3",
]
# The head options of the flat section every head shared before the registry (config version 1).
V1_HEAD = {
    "name": "clipspm",
    "heads": 8,
    "dim_head": None,
    "mlp_dim": 2048,
    "attn_dropout": 0.2,
    "ffn_dropout": 0.05,
    "prompt_hidden": 2048,
    "mid_dim_text": 1.5,
    "mid_dim_vision": 0.5,
    "negative_slope": 0.0025,
    "alpha": 0.2,
    "motion_alpha": 1.0,
    "motion_alpha_learnable": False,
    "hsmr": True,
    "hsmr_source": "final",
    "spm": "generated",
    "padm": True,
    "consistency_weight": 0.0,
    "text_distance_weight": 0.0,
    "merge_before": False,
    "fusion_beta": None,
    "bidirectional": True,
    "proto_scale": 1.0,
    "aux_weights": {},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("registry")
    spec = DemoSpec(videos_per_class=6, n_frames=12, frames_jitter=2, size=48)
    render_demo_dataset(base / "videos", spec)
    return extract_store(base / "videos", base / "store.zarr", "fsar-tiny-vit")


def tiny(name: str) -> list[str]:
    return [f"head.{key}={json.dumps(value)}" for key, value in HEADS[name].tiny.items()]


def test_a_key_of_another_head_is_refused_naming_both_heads():
    with pytest.raises(
        ConfigError, match="head.merge_before is an option of clipfsar, not of head"
    ):
        load_config([], ["head.name=clipspm", "head.merge_before=true"])
    with pytest.raises(ConfigError, match="unknown head 'trxx'.*trx"):
        load_config([], ["head.name=trxx"])
    config = load_config([], ["head.name=trx", "head.temporal_set=[1]"])
    assert config.head.temporal_set == [1] and not hasattr(config.head, "hsmr")


def test_switching_the_head_drops_the_options_of_the_previous_one():
    config = load_config([], ["head.padm=false", "head.name=otam", "head.lam=0.5"])
    assert (config.head.name, config.head.lam) == ("otam", 0.5)
    back = with_overrides(config, {"head.name": "clipspm"})
    assert back.head.padm is True  # clipspm's default, not the earlier override
    same = with_overrides(config, {"head.name": "otam"})
    assert same.head.lam == 0.5  # naming the same head keeps its options


def test_version_1_records_keep_their_numbers():
    clipspm = upgrade_config_dict({"head": V1_HEAD}, 1)["head"]
    assert "merge_before" not in clipspm and "dim_head" not in clipspm  # null meant 256
    otam = upgrade_config_dict({"head": {**V1_HEAD, "name": "otam"}}, 1)["head"]
    assert (otam["lam"], otam["prototype"]) == (0.5, True)  # the otam of version 1
    assert set(otam) == {"name", "aux_weights", "bidirectional", "lam", "prototype"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_trains_resumes_and_evaluates_through_the_cli(name, store, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--store", str(store), "--out", str(run), "--head", name, *tiny(name), *RUN]
    assert main(["train", "--steps", "2", *common]) == 0
    assert main(["train", "--steps", "3", *common]) == 0
    printed = capsys.readouterr().out
    last = load_checkpoint(run / "last.pt")
    trained = any(value.is_floating_point() for value in last["head"].values())
    assert last["step"] == (3 if trained else 0)
    assert last["config_version"] == 2 and last["config"]["head"]["name"] == name
    if trained:
        assert "resum" in printed.lower()
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(run / "best.pt"), "--out", str(out), *RUN[-4:]]
    assert main([*args, "eval.episodes=40"]) == 0
    result = json.loads(out.read_text())
    assert result["head"] == name and 0.0 <= result["accuracy"] <= 100.0
    assert result["episodes"] == 40


@pytest.mark.slow
def test_a_checkpoint_written_before_the_registry_scores_the_same(store, tmp_path):
    run = tmp_path / "run"
    widths = ["head.heads=2", "head.dim_head=8", "head.mlp_dim=32", "head.prompt_hidden=32"]
    assert (
        main(["train", "--store", str(store), "--out", str(run), "--steps", "2"] + widths + RUN)
        == 0
    )
    payload = load_checkpoint(run / "best.pt")
    old_head = {
        **V1_HEAD,
        **{
            k: payload["config"]["head"][k]
            for k in ("heads", "dim_head", "mlp_dim", "prompt_hidden")
        },
    }
    old = {k: v for k, v in payload.items() if k != "config_version"}
    old["config"] = {**payload["config"], "head": old_head}
    torch.save(old, tmp_path / "old.pt")
    scores = []
    for name in ("best.pt", "old.pt"):
        source = run / name if name == "best.pt" else tmp_path / name
        out = tmp_path / f"{name}.json"
        assert (
            main(
                [
                    "eval",
                    "--checkpoint",
                    str(source),
                    "--out",
                    str(out),
                    *RUN[-4:],
                    "eval.episodes=40",
                ]
            )
            == 0
        )
        scores.append(json.loads(out.read_text())["accuracy"])
    assert scores[0] == scores[1]
    # and a version-1 last.pt resumes under the same settings
    torch.save(old, run / "last.pt")
    assert (
        main(["train", "--store", str(store), "--out", str(run), "--steps", "3"] + widths + RUN)
        == 0
    )
    assert load_checkpoint(run / "last.pt")["step"] == 3


@pytest.mark.slow
def test_ablate_compares_methods_on_one_store_and_one_episode_list(store, tmp_path):
    out = tmp_path / "methods"
    args = ["ablate", "--store", str(store), "--out", str(out), "--steps", "2"]
    grid = ["--grid", "head.name=otam,trx,hyrsm,clipfsar,clipspm"]
    assert main(args + grid + RUN) == 0
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0].startswith("head.name,accuracy") and len(rows) == 6
    assert [row.split(",")[0] for row in rows[1:]] == [
        "otam",
        "trx",
        "hyrsm",
        "clipfsar",
        "clipspm",
    ]
    results = json.loads((out / "ablation.json").read_text())
    assert len({r["result"]["episodes_sha256"] for r in results}) == 1
