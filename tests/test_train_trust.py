"""Trusting fsar train / eval (issue 12): no silent wrong number, no lost work, no traceback.

Every test reproduces a failure of the issue on a real store of rendered demo videos: kills and
full disks at each checkpoint write, resumes under changed settings, diverging weights, and
SIGINT / SIGTERM sent to a real ``fsar train`` process.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fsar.pipelines.checkpoint as checkpoint_module
from fsar.cli import main
from fsar.config import load_config
from fsar.data.synthetic import DemoSpec, render_demo_dataset
from fsar.pipelines.checkpoint import FORMAT, load_checkpoint
from fsar.pipelines.train import TrainingDiverged, train_heads

from .conftest import REPO, run_fsar, start_fsar
from .test_pipelines import SMALL_HEAD, extract_store, small_head

STEPS, VAL_EVERY = 6, 2


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("trust")
    spec = DemoSpec(videos_per_class=6, n_frames=12, frames_jitter=2, size=48)
    render_demo_dataset(base / "videos", spec)
    return extract_store(base / "videos", base / "store.zarr", "fsar-tiny-vit")


def overrides(store: Path, out: Path, steps: int = STEPS, *extra: str) -> list[str]:
    head = next((e.split("=", 1)[1] for e in extra if e.startswith("head.name=")), "clipspm")
    return [
        f"train.store={store}",
        f"train.out={out}",
        f"train.steps={steps}",
        f"train.val_every={VAL_EVERY}",
        f"head.name={head}",
        "train.device=cpu",
        *small_head(head),
        *extra,
    ]


def cli_args(store: Path, out: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return ["train", *overrides(store, out, steps, *extra)]


def train(store: Path, out: Path, steps: int = STEPS, *extra: str):
    return train_heads(load_config([], overrides(store, out, steps, *extra)), progress=False)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    """An uninterrupted run: what every interrupted and resumed run must end as."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(store, out)
    return out


def assert_same_tree(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def metric_lines(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock rate."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "episodes_per_s"} for line in lines]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bitwise the same checkpoints (weights, optimizer, random states, history) and metrics."""
    for name in ("last.pt", "best.pt"):
        got, expected = load_checkpoint(run / name), load_checkpoint(reference / name)
        for key in ("step", "best_step", "best_accuracy", "history"):
            assert got[key] == expected[key], (name, key)
        for key in ("head", "optimizer", "rng"):
            assert_same_tree(got[key], expected[key], f"{name}:{key}")
    assert metric_lines(run) == metric_lines(reference)


def assert_claims_hold(run: Path) -> None:
    """last.pt names as best the step best.pt holds; no temporary file is left."""
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["best_step"] == best["step"]
    assert last["best_accuracy"] == best["best_accuracy"]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".partial")]


class Killed(BaseException):
    """Stands for a SIGKILL: nothing in the run may catch it."""


def write_boundaries(reference: Path) -> list[tuple[int, str]]:
    """(k, before|after) for every checkpoint write of the uninterrupted run."""
    history = load_checkpoint(reference / "last.pt")["history"]
    best, writes = -1.0, 0
    for entry in history:
        writes += 1  # last.pt
        if entry["accuracy"] > best:
            best, writes = entry["accuracy"], writes + 1  # best.pt
    return [(k, when) for k in range(1, writes + 1) for when in ("before", "after")]


def dying_write(real_write, k: int, when: str):
    """The checkpoint writer, killed just before or just after its k-th write."""
    calls = {"n": 0}

    def write(path, payload):
        calls["n"] += 1
        if calls["n"] == k and when == "before":
            raise Killed
        real_write(path, payload)
        if calls["n"] == k and when == "after":
            raise Killed

    return write


@pytest.mark.slow
def test_a_kill_at_every_checkpoint_write_resumes_to_the_uninterrupted_run(
    store, reference, tmp_path, monkeypatch
):
    boundaries = write_boundaries(reference)
    assert len(boundaries) >= 8  # 3 validations: 3 x last.pt + at least one best.pt
    real_write = checkpoint_module._write_atomic
    for k, when in boundaries:
        run = tmp_path / f"kill_{k}_{when}"
        monkeypatch.setattr(checkpoint_module, "_write_atomic", dying_write(real_write, k, when))
        with pytest.raises(Killed):
            train(store, run)
        monkeypatch.setattr(checkpoint_module, "_write_atomic", real_write)
        if (run / "last.pt").exists():
            last = load_checkpoint(run / "last.pt")
            held = load_checkpoint(run / "best.pt")["step"] if (run / "best.pt").exists() else -1
            # the only disagreement a kill can leave: last.pt holds the new best step itself
            assert held == last["best_step"] or last["best_step"] == last["step"], (k, when)
        train(store, run)
        assert_claims_hold(run)
        assert_same_run(run, reference)


KILLER = """
import os, sys
from fsar.cli import main

target, when = os.environ["KILL_AT"].split(":")
real_replace = os.replace

def replace(src, dst):
    if str(dst).endswith(target) and when == "before":
        os._exit(137)  # the temporary file is complete but not yet renamed
    real_replace(src, dst)
    if str(dst).endswith(target) and when == "after":
        os._exit(137)

os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_process_killed_inside_a_write_leaves_nothing_stray_after_the_rerun(
    store, reference, tmp_path
):
    kill_at = "best.pt:before"  # the other boundaries are covered in-process above
    run = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *cli_args(store, run)],
        cwd=REPO,
        env={**os.environ, "KILL_AT": kill_at},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == 137, killed.stderr
    # the first write is last.pt at step 2, then best.pt dies before its rename
    assert [p.name for p in run.glob("best.pt.*.partial")]
    assert load_checkpoint(run / "last.pt")["best_step"] == 2 and not (run / "best.pt").exists()
    printed = run_fsar(*cli_args(store, run))
    assert "best.pt repaired from" in printed.stdout
    assert_claims_hold(run)
    assert_same_run(run, reference)


def raise_enospc_at(call: int):
    """A torch.save that fills the disk on its ``call``-th use, after writing a few bytes."""
    real_save, calls = torch.save, {"n": 0}

    def save(obj, file, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            file.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, file, *args, **kwargs)

    return save


@pytest.mark.slow
@pytest.mark.parametrize("call", [2, 3, 4])  # best.pt of step 2, last.pt of step 4, then next
def test_a_full_disk_stops_with_one_line_and_consistent_files(
    store, reference, tmp_path, monkeypatch, capsys, call
):
    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", raise_enospc_at(call))
    code = main(cli_args(store, run))
    monkeypatch.undo()
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1
    message = errors[0]
    assert "No space left on device" in message and "rerun the same command" in message
    assert not list(run.glob("*.partial"))
    last = load_checkpoint(run / "last.pt")
    assert f"last.pt holds step {last['step']}" in message  # the claims, read from the files
    if (run / "best.pt").exists():
        held = load_checkpoint(run / "best.pt")["step"]
        assert f"best.pt holds step {held}" in message
    else:
        held = None
        assert "best.pt" not in message.split("Kept:")[1].split("(")[0]
    if held != last["best_step"]:  # only a stop between the two writes, repaired on resume
        assert last["best_step"] == last["step"]
        assert f"copies the best step {last['step']} from last.pt to best.pt" in message
    assert main(cli_args(store, run)) == 0  # disk freed: the rerun repairs and resumes
    assert_claims_hold(run)
    assert_same_run(run, reference)


@pytest.fixture(scope="module")
def short_run(store, tmp_path_factory) -> Path:
    """A finished 4-step run that the resume tests try to continue."""
    out = tmp_path_factory.mktemp("short") / "run"
    train(store, out, 4)
    return out


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("episodes.shot=2", "episodes.shot 1 -> 2"),
        ("protocol.train_query=3", "protocol.train_query 4 -> 3"),
        ("eval.seed=5", "eval.seed 0 -> 5"),
        ("train.val_episodes=30", "selection.episodes_sha256"),
        ("head.alpha=0.3", "head.alpha 0.2 -> 0.3"),
        ("train.lr=0.002", "train.lr 0.001 -> 0.002"),
        ("train.seed=7", "train.seed 6 -> 7"),
        ("train.steps=3", "train.steps 4 -> 3"),
    ],
)
def test_resuming_with_a_setting_that_moves_numbers_is_refused_naming_it(
    store, short_run, tmp_path, capsys, change, named
):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    before = (run / "last.pt").read_bytes()
    code = main(cli_args(store, run, 4, change))
    message = capsys.readouterr().err.strip()
    assert code == 2 and len(message.splitlines()) == 1
    assert "cannot resume" in message and named in message
    assert (run / "last.pt").read_bytes() == before


def test_resuming_on_another_store_is_refused_naming_its_fingerprint(
    store, short_run, tmp_path, capsys
):
    other = extract_store(
        store.parent / "videos", tmp_path / "rn.zarr", "fsar-tiny-rn", "[train,val]"
    )
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    assert main(cli_args(other, run, 4)) == 2
    message = capsys.readouterr().err
    assert "store.fingerprint" in message and "train.store" not in message


@pytest.mark.slow
def test_device_changes_and_more_steps_continue_the_run(store, short_run, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    result = train(store, run, STEPS, "train.device=cpu", "train.log_every=1", "eval.episodes=7")
    assert result.resumed_from == 4 and result.steps == STEPS
    assert_same_run(run, reference)  # 4 steps, then 2 more == 6 steps in one go


def test_an_infinite_learning_rate_stops_before_anything_is_written(store, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(cli_args(store, run, STEPS, "train.lr=.inf"))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "NaN or inf at step 1" in message and "no checkpoint was written" in message
    assert not list(run.glob("*.pt*"))


def test_parameters_turning_nan_keep_the_last_good_checkpoints_and_say_which(
    store, tmp_path, monkeypatch
):
    real_step, calls = torch.optim.Adam.step, {"n": 0}

    def step_then_poison(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # step 5: after the validation (and checkpoints) of step 4
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_poison)
    with pytest.raises(TrainingDiverged) as caught:
        train(store, tmp_path / "run")
    message = str(caught.value)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert last["step"] == 4 and "at step 5" in message
    assert "last.pt holds step 4" in message and f"best.pt holds step {best['step']}" in message
    for payload in (last, best):
        assert all(torch.isfinite(t).all() for t in payload["head"].values())


def test_eval_refuses_a_checkpoint_with_nan_weights_in_one_line(short_run, tmp_path, capsys):
    payload = load_checkpoint(short_run / "best.pt")
    name = next(k for k, v in payload["head"].items() if v.is_floating_point())
    payload["head"][name] = torch.full_like(payload["head"][name], float("nan"))
    torch.save({**payload, "format": FORMAT}, tmp_path / "doctored.pt")
    code = main(["eval", "--checkpoint", str(tmp_path / "doctored.pt"), *SMALL_HEAD])
    message = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len([m for m in message if "error" in m]) == 1
    assert "NaN or infinite weights" in message[-1] and name in message[-1]
    assert not list(tmp_path.glob("eval_*.json"))


def test_eval_refuses_non_finite_scores(store, tmp_path, capsys):
    out = tmp_path / "x.json"
    code = main(
        ["eval", "--store", str(store), "--head", "proto_mean", "--out", str(out)]
        + ["head.proto_scale=.inf", "eval.episodes=20", "--device", "cpu"]
    )
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "NaN or infinite scores" in message
    assert not out.exists()


def test_eval_shows_progress_and_parameter_free_heads_print_no_training_bar(
    store, tmp_path, capsys
):
    assert main(cli_args(store, tmp_path / "mean", STEPS, "head.name=proto_mean")) == 0
    printed = capsys.readouterr()
    assert "train proto_mean" not in printed.err and "step/s" not in printed.err
    assert "best val accuracy" in printed.out
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(tmp_path / "mean" / "best.pt"), "--out", str(out)]
    assert main([*args, "eval.episodes=20", "eval.episode_batch=5"]) == 0
    printed = capsys.readouterr()
    assert "20/20" in printed.err and "episode" in printed.err
    assert "20 episodes" in printed.out


def wait_for_training(process: subprocess.Popen, run: Path, step: int) -> None:
    """Until metrics.jsonl shows ``step`` training steps done."""
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step}: {process.poll()}")


SIGNAL_STEPS = 20


@pytest.fixture(scope="module")
def long_reference(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long") / "run"
    train(store, out, SIGNAL_STEPS, "train.val_every=10")
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_the_next_step_and_the_rerun_equals_an_uninterrupted_run(
    store, long_reference, tmp_path, signum, code
):
    run = tmp_path / "run"
    args = cli_args(store, run, SIGNAL_STEPS, "train.val_every=10")
    process = start_fsar(*args)
    wait_for_training(process, run, 3)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert "interrupted: rerun the same command to resume" in last_line
    assert "Traceback" not in stderr
    stopped = load_checkpoint(run / "last.pt")["step"]
    assert 3 <= stopped < SIGNAL_STEPS
    assert f"last.pt holds step {stopped}" in last_line
    trained = [x["step"] for x in metric_lines(run) if x["kind"] == "train"]
    assert trained[-1] == stopped  # no finished step is lost, none is past the checkpoint
    printed = run_fsar(*args).stdout
    assert f"resumed at step {stopped}" in printed
    assert_same_run(run, long_reference)


def test_one_resume_check_lists_the_keys_of_train_and_finetune():
    from fsar.config import Config, to_dict
    from fsar.pipelines.run_checkpoints import (
        FINETUNE_COMPARED,
        TRAIN_COMPARED,
        resume_conflicts,
    )

    def record(**changes):
        config = to_dict(Config())
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            config[section][key] = value
        return {"config": config, "store": {"fingerprint": "f", "train_videos": 10}}

    saved = record()
    moved = {
        "finetune__flip": True,
        "finetune__backbone_lr": 1e-5,
        "dataset__variant": "cmn",
        "model__name": "RN50",
        "extract__seq_len": 16,
        "train__bf16": False,
    }
    free = {
        "finetune__workers": 0,
        "finetune__validation": "decoded",
        "finetune__grad_checkpointing": True,
        "dataset__root": "/elsewhere",
        "train__device": "cuda:1",
        "train__log_every": 1,
        "train__compile": True,
        "eval__episodes": 7,
        "eval__split": "val",
    }
    for key, value in moved.items():
        conflicts = resume_conflicts(saved, record(**{key: value}), FINETUNE_COMPARED, 0)
        assert len(conflicts) == 1 and conflicts[0].startswith(key.replace("__", ".")), key
    for key, value in free.items():
        assert resume_conflicts(saved, record(**{key: value}), FINETUNE_COMPARED, 0) == [], key
    # fsar train reads the store, not the videos or the encoder settings
    assert resume_conflicts(saved, record(model__name="RN50"), TRAIN_COMPARED, 0) == []
    assert resume_conflicts(saved, record(train__steps=9000), TRAIN_COMPARED, 2000) == []
    other_videos = {**record(), "store": {"fingerprint": "f", "train_videos": 9}}
    assert resume_conflicts(saved, other_videos, FINETUNE_COMPARED, 0) == [
        "store.train_videos 10 -> 9"
    ]
