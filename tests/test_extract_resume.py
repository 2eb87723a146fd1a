"""Crash safety and sharding of extraction: SIGKILL + rerun, and torchrun ranks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fsar.cache import open_store

from .conftest import REPO, assert_same_store, run_fsar

# One thread everywhere: the same GEMM blocking in every process, so stores compare bitwise.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def extract_args(root: Path, out: Path) -> list[str]:
    return [
        "extract",
        "--dataset",
        "folder",
        "--root",
        str(root),
        "--model",
        "fsar-tiny-vit",
        "--out",
        str(out),
        "--workers",
        "0",
        "--views",
        "center,crop0",
        "extract.chunk_videos=2",
        "extract.batch_frames=8",
    ]


@pytest.fixture(scope="module")
def many_videos(video_root, tmp_path_factory) -> Path:
    """The rendered dataset copied 4 times under new class names: ~70 videos, 35 blocks."""
    root = tmp_path_factory.mktemp("many")
    for copy in range(4):
        for class_dir in video_root.iterdir():
            if class_dir.is_dir():
                shutil.copytree(class_dir, root / f"{class_dir.name}_{copy}")
    return root


@pytest.fixture(scope="module")
def reference_store(many_videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_fsar(*extract_args(many_videos, out), env=ENV)
    return out


def done_count(path: Path) -> int:
    try:
        return int((np.asarray(open_store(path).status) != 0).sum())
    except Exception:  # not created yet
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_videos", [-1, 0, 9, 40])
def test_sigkill_then_rerun_finishes_the_store_bitwise_without_redoing_done_videos(
    many_videos, reference_store, tmp_path, kill_after_videos
):
    out = tmp_path / "killed.zarr"
    process = subprocess.Popen(
        [sys.executable, "-m", "fsar", *extract_args(many_videos, out)],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    # -1: kill as soon as the store folder appears (mid-creation); otherwise once N videos are done
    while time.time() < deadline and process.poll() is None:
        if kill_after_videos < 0 and out.exists():
            break
        if kill_after_videos >= 0 and done_count(out) > kill_after_videos:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = max(done_count(out), 0)
    total = len(open_store(reference_store).video_ids)
    assert finished_before < total, "the run finished before it could be killed"

    result = run_fsar(*extract_args(many_videos, out), env=ENV)
    # this run encoded what was left, bar the videos it found undecodable or missing
    encoded_now = int(result.stdout.split("this run encoded ")[1].split(" videos")[0])
    tail = result.stdout.split("including start-up); ")[1]
    failed_now = int(tail.split(" failed to decode")[0])
    missing_now = int(tail.split(", ")[1].split(" missing")[0])
    assert encoded_now + failed_now + missing_now == total - finished_before
    assert_same_store(out, reference_store)
    assert run_fsar("cache", "verify", str(out)).returncode == 0


@pytest.mark.slow
def test_two_torchrun_ranks_build_the_same_store_as_one_process(
    many_videos, reference_store, tmp_path
):
    out = tmp_path / "ranks.zarr"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            "--master_port=29533",
            "-m",
            "fsar",
            *extract_args(many_videos, out),
        ],
        cwd=REPO,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("this run encoded") == 1, "only rank 0 reports"
    assert_same_store(out, reference_store)
