"""fsar finetune stops cleanly on SIGTERM and resumes only the same run (issue 12).

One short run on rendered demo videos with the tiny ViT: a reference run, a real ``fsar
finetune`` process stopped by SIGTERM, a refused resume under another setting, and an allowed
resume (other worker count) that ends bitwise equal to the reference.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from fsar.cli import main
from fsar.config import load_config
from fsar.data.synthetic import DemoSpec, render_demo_dataset
from fsar.pipelines.checkpoint import load_checkpoint
from fsar.pipelines.finetune import finetune

from .conftest import start_fsar
from .test_train_trust import metric_lines, wait_for_training

STEPS = 4
SETTINGS = [
    "model.name=fsar-tiny-vit",
    "head.name=clipfsar",
    "train.device=cpu",
    "head.heads=2",
    "head.mlp_dim=64",
    "train.tasks_per_batch=2",
    "train.val_episodes=30",
    "train.log_every=1",
    "train.lr=1e-3",
    f"train.steps={STEPS}",
    "train.val_every=2",
]


def settings(videos: Path, out: Path, *extra: str) -> list[str]:
    return ["dataset.name=demo", f"dataset.root={videos}", f"train.out={out}", *SETTINGS, *extra]


@pytest.fixture
def one_cpu_thread():
    """On CPU the worker count sets the main process's thread count (cpu_threads_beside_workers),
    and another thread count may round a matmul differently: one thread everywhere keeps the
    runs comparable bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_sigterm_stops_finetune_and_only_the_same_run_resumes(tmp_path, capsys, one_cpu_thread):
    spec = DemoSpec(videos_per_class=6, n_frames=14, size=64)
    videos = render_demo_dataset(tmp_path / "videos", spec).root
    reference = tmp_path / "reference"
    finetune(load_config([], settings(videos, reference, "finetune.workers=0")), progress=False)

    run = tmp_path / "run"
    process = start_fsar(
        "finetune", *settings(videos, run, "finetune.workers=1"), env={"OMP_NUM_THREADS": "1"}
    )
    wait_for_training(process, run, 1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert "interrupted: rerun the same command to resume" in stderr.strip().splitlines()[-1]
    stopped = load_checkpoint(run / "last.pt")["step"]
    assert 1 <= stopped < STEPS
    assert [x["step"] for x in metric_lines(run) if x["kind"] == "train"][-1] == stopped

    code = main(["finetune", *settings(videos, run, "protocol.train_query=3")])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "cannot resume" in message and "protocol.train_query 4 -> 3" in message

    # the decode worker count changes no number: the resumed run ends as the reference
    assert main(["finetune", *settings(videos, run, "finetune.workers=0")]) == 0
    assert f"resumed at step {stopped}" in capsys.readouterr().out
    for name in ("last.pt", "best.pt"):
        got, expected = load_checkpoint(run / name), load_checkpoint(reference / name)
        assert got["step"] == expected["step"] and got["history"] == expected["history"]
        for part in ("visual", "head"):
            for key, value in expected[part].items():
                assert torch.equal(got[part][key], value), (name, part, key)
    assert metric_lines(run) == metric_lines(reference)
