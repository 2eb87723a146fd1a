"""Behaviour of fsar train / eval / ablate on a real store of rendered demo videos (issue 4).

One module-scoped store (the demo dataset with fewer, smaller videos, extracted with the tiny
ViT) serves every test; training runs use small heads and few steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fsar.config import load_config
from fsar.data.synthetic import DemoSpec, render_demo_dataset
from fsar.extract.runner import run_extraction
from fsar.heads.registry import head_spec
from fsar.pipelines.checkpoint import load_checkpoint

from .conftest import REPO, run_fsar

SMALL_HEAD = [
    "head.heads=2",
    "head.dim_head=8",
    "head.mlp_dim=32",
    "head.prompt_hidden=32",
    "train.tasks_per_batch=4",
    "train.episode_batch=2",
    "train.val_episodes=40",
    "train.log_every=1",
    "eval.episodes=60",
    "eval.episode_batch=30",
    "train.lr=1e-3",
]


def small_head(head: str) -> list[str]:
    """SMALL_HEAD less the head options ``head`` does not have (another head's key is refused)."""
    own = {f.name for f in dataclasses.fields(head_spec(head).config)}
    return [o for o in SMALL_HEAD if not o.startswith("head.") or o[5:].split("=")[0] in own]


def extract_store(root: Path, out: Path, model: str, splits: str = "[train,val,test]") -> Path:
    config = load_config(
        [],
        [
            "dataset.name=demo",
            f"dataset.root={root}",
            f"dataset.splits={splits}",
            f"model.name={model}",
            f"extract.out={out}",
            "extract.workers=0",
        ],
    )
    run_extraction(config, progress=False)
    return out


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pipelines")
    spec = DemoSpec(videos_per_class=6, n_frames=12, frames_jitter=2, size=48)
    render_demo_dataset(base / "videos", spec)
    return extract_store(base / "videos", base / "store.zarr", "fsar-tiny-vit")


def train_args(store: Path, out: Path, head: str = "clipspm", steps: int = 6) -> list[str]:
    return [
        "train",
        "--store",
        str(store),
        "--out",
        str(out),
        "--head",
        head,
        "--steps",
        str(steps),
        "train.val_every=3",
        *small_head(head),
    ]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["head"]


@pytest.mark.slow
def test_train_then_eval_writes_checkpoints_metrics_and_a_reproducible_result(demo_store, tmp_path):
    run = tmp_path / "run"
    printed = run_fsar(*train_args(demo_store, run, steps=6)).stdout
    assert "best val accuracy" in printed
    assert {"best.pt", "last.pt", "metrics.jsonl", "config.json"} <= {p.name for p in run.iterdir()}
    assert any((run / "tensorboard").iterdir())
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [x["step"] for x in lines if x["kind"] == "val"] == [3, 6]
    last = load_checkpoint(run / "last.pt")
    assert last["step"] == 6 and last["protocol"]["selection_split"] == "val"
    assert last["store"]["fingerprint"] and last["config"]["train"]["betas"] == [0.5, 0.999]

    results = []
    for name in ("a.json", "b.json"):
        run_fsar(
            "eval", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / name), *SMALL_HEAD
        )
        results.append(json.loads((tmp_path / name).read_text()))
    first, second = results
    # same seed, same store: the same episodes and the same accuracy, bit for bit
    assert first["episodes_sha256"] == second["episodes_sha256"]
    assert first["accuracy"] == second["accuracy"] and first["episodes"] == 60
    assert 0.0 <= first["accuracy"] <= 100.0
    assert first["selection"]["split"] == "val" and first["regime"] == "frozen cache"
    confusion = np.loadtxt(
        tmp_path / "a_confusion.csv", delimiter=",", skiprows=1, usecols=range(1, 7)
    )
    assert confusion.sum() == 60 * 5 * 1  # episodes x way x query
    assert math.isclose(100 * np.trace(confusion) / confusion.sum(), first["accuracy"])

    run_fsar(
        "report", str(tmp_path / "a.json"), "--out", str(tmp_path / "report"), "--runs", str(run)
    )
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"{first['accuracy']:.1f} ± {first['ci95']:.1f}" in report
    assert (tmp_path / "report" / "learning_curves.png").is_file()


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_same_weights(demo_store, tmp_path):
    args = train_args(demo_store, tmp_path / "full", steps=12)
    run_fsar(*args)
    killed = tmp_path / "killed"
    args_killed = train_args(demo_store, killed, steps=12)
    process = subprocess.Popen(
        [sys.executable, "-m", "fsar", *args_killed],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (killed / "last.pt").exists() and load_checkpoint(killed / "last.pt")["step"] >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = load_checkpoint(killed / "last.pt")["step"]
    assert interrupted_at < 12, "the run finished before it could be killed"
    printed = run_fsar(*args_killed).stdout
    assert f"resumed at step {interrupted_at}" in printed
    for name in ("last.pt", "best.pt"):
        full, resumed = state_of(tmp_path / "full" / name), state_of(killed / name)
        assert full.keys() == resumed.keys()
        for key in full:
            assert torch.equal(full[key], resumed[key]), (name, key)
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [
        json.loads(x)["step"]
        for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("episodes.way=13", "episodes.way"),  # 12 training classes
        ("protocol.train_query=6", "protocol.train_query"),  # 6 videos per class
        ("protocol.train_views=[center,flip]", "no cached view"),
        ("train.tasks_per_batch=3", "multiple of train.episode_batch"),
    ],
)
def test_impossible_requests_fail_before_training_and_say_what_to_change(
    demo_store, tmp_path, override, message
):
    result = run_fsar(*train_args(demo_store, tmp_path / "run"), override, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_store_without_the_selection_split_is_refused(demo_store, tmp_path):
    store = extract_store(
        demo_store.parent / "videos", tmp_path / "no_val.zarr", "fsar-tiny-vit", "[train,test]"
    )
    result = run_fsar(*train_args(store, tmp_path / "run"), check=False)
    assert result.returncode == 2 and "holds no 'val' videos" in result.stderr


@pytest.mark.slow
def test_a_store_from_another_model_than_the_checkpoint_is_refused(demo_store, tmp_path):
    run_fsar(*train_args(demo_store, tmp_path / "run", steps=3))
    other = extract_store(
        demo_store.parent / "videos", tmp_path / "rn.zarr", "fsar-tiny-rn", "[test]"
    )
    result = run_fsar(
        "eval",
        "--checkpoint",
        str(tmp_path / "run" / "best.pt"),
        "--store",
        str(other),
        "--out",
        str(tmp_path / "x.json"),
        check=False,
    )
    assert result.returncode == 2
    assert "another encoder" in result.stderr and "fsar-tiny-rn" in result.stderr


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    demo_store, tmp_path, monkeypatch
):
    import fsar.pipelines.train as train_module

    real_loss, calls = train_module.episode_loss, {"n": 0}

    def loss_turning_nan(output, labels, weights=None):
        calls["n"] += 1
        loss = real_loss(output, labels, weights)
        return loss * float("nan") if calls["n"] > 2 * 4 else loss  # 2 micro-batches per step

    monkeypatch.setattr(train_module, "episode_loss", loss_turning_nan)
    config = load_config(
        [],
        [
            f"train.store={demo_store}",
            f"train.out={tmp_path / 'run'}",
            "train.steps=10",
            "train.val_every=2",
            *SMALL_HEAD,
        ],
    )
    with pytest.raises(train_module.TrainingDiverged, match="at step 5"):
        train_module.train_heads(config, progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4


@pytest.mark.slow
def test_official_heads_evaluate_without_training_and_compare_pairs_episodes(demo_store, tmp_path):
    from fsar.heads import to_official
    from fsar.pipelines.build import build_head

    config = load_config([], ["head.name=clipspm", *SMALL_HEAD])
    torch.manual_seed(0)
    head = build_head(config.head, 64, {})
    official = tmp_path / "official.pth"
    torch.save({"model_state_dict": to_official(head)}, official)
    out = tmp_path / "official.json"
    run_fsar(
        "eval",
        "--official",
        str(official),
        "--head",
        "clipspm",
        "--store",
        str(demo_store),
        "--out",
        str(out),
        *SMALL_HEAD,
    )
    assert json.loads(out.read_text())["official"] == str(official)

    for name, head_name in (("a", "clipfsar"), ("b", "clipspm")):
        run_fsar(*train_args(demo_store, tmp_path / name, head=head_name, steps=3))
    printed = run_fsar(
        "eval",
        "--compare",
        str(tmp_path / "a" / "best.pt"),
        str(tmp_path / "b" / "best.pt"),
        *SMALL_HEAD,
    ).stdout
    assert "A - B =" in printed and "identical episodes" in printed


@pytest.mark.slow
def test_ablate_trains_every_grid_point_on_the_same_episodes(demo_store, tmp_path):
    out = tmp_path / "ablation"
    printed = run_fsar(
        "ablate",
        "--store",
        str(demo_store),
        "--out",
        str(out),
        "--head",
        "clipspm",
        "--steps",
        "3",
        "--grid",
        "head.padm=true,false",
        "train.val_every=3",
        *SMALL_HEAD,
    ).stdout
    table = (out / "table.md").read_text()
    assert "| head.padm | accuracy |" in table and table.count("\n| ") == 3  # header + 2 points
    rows = (out / "table.csv").read_text().splitlines()
    assert rows[0].startswith("head.padm,accuracy") and len(rows) == 3
    assert rows[1].split(",")[3] == "0.0"  # the first point against itself
    results = json.loads((out / "ablation.json").read_text())
    assert len({r["result"]["episodes_sha256"] for r in results}) == 1
    assert "table.md" in printed
