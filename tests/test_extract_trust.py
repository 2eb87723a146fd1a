"""Extraction keeps its promises when things go wrong (issue 12): one writer per store, leftovers
of killed runs cleaned, Ctrl-C / SIGTERM stop cleanly and resume bitwise, a full disk is one line
and resumable, missing videos are counted apart from undecodable ones."""

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

import numpy as np
import pytest

import fsar.cache.backends as backends
from fsar.cache import export_hdf5, open_store
from fsar.cache.backends import StoreWriteError
from fsar.cache.lock import StoreLockedError, lock_path, writer_lock
from fsar.config import load_config
from fsar.extract.runner import run_extraction, staging_path

from .conftest import REPO, assert_same_store, run_fsar

# One thread everywhere: the same GEMM blocking in every process, so stores compare bitwise.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
OPTIONS = ["extract.chunk_videos=2", "extract.batch_frames=8", "extract.workers=0"]


def extract_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--dataset", "folder", "--root", str(root), "--model", "fsar-tiny-vit",
            "--out", str(out), *OPTIONS, *extra]  # fmt: skip


def config_for(root: Path, out: Path, *extra: str):
    keys = ["dataset.name=folder", f"dataset.root={root}", "model.name=fsar-tiny-vit",
            f"extract.out={out}", *OPTIONS, *extra]  # fmt: skip
    return load_config([], keys)


def encoded(stdout: str) -> int:
    return int(stdout.split("this run encoded ")[1].split(" videos")[0])


@pytest.fixture(scope="module")
def reference(video_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust_ref") / "ref.zarr"
    run_fsar(*extract_args(video_root, out), env=ENV)
    return out


def assert_one_line(result, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # one message from fsar (the video decoders print their own complaints about bad files)
    errors = [line for line in result.stderr.splitlines() if line.startswith("fsar ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, result.stderr)


@pytest.mark.slow
# ------------------------------------------------------------------------ one writer per store
@pytest.mark.parametrize("suffix,backend", [(".zarr", "zarr"), (".h5", "hdf5")])
def test_a_second_writer_is_refused_and_leftovers_of_killed_runs_are_cleaned(
    video_root, reference, tmp_path, suffix, backend
):
    out = tmp_path / f"store{suffix}"
    args = extract_args(video_root, out, "--backend", backend)
    with writer_lock(out):  # this test process is the other writer
        refused = run_fsar(*args, env=ENV, check=False)
    assert_one_line(refused, 2, str(out), "being written by another fsar extract",
                    f"pid {os.getpid()}")  # fmt: skip
    assert not out.exists() and not lock_path(out).exists()

    # what killed runs leave: a store killed early, a half-written chunk, a half-built store
    # beside it, a lock file naming a dead process
    work = staging_path(out) if backend == "hdf5" else out
    run = subprocess.Popen([sys.executable, "-m", "fsar", *args], cwd=REPO,
                           env={**os.environ, **ENV}, stdout=subprocess.DEVNULL)  # fmt: skip
    while not (work / "features").is_dir() and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    (work / "features" / ".0.deadbeef.partial").write_bytes(b"half a chunk")
    leftover = tmp_path / f".{work.name}.0123456789ab.tmp"
    (leftover / "features").mkdir(parents=True)
    lock_path(out).write_text(json.dumps({"pid": 999999, "host": "x", "started": "-"}))
    run_fsar(*args, env=ENV)
    assert not leftover.exists() and not lock_path(out).exists()
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.glob(".*.tmp"))
    assert not staging_path(out).exists() or backend == "zarr"
    assert_same_store(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("suffix,backend", [(".zarr", "zarr"), (".h5", "hdf5")])
def test_two_extractions_started_together_build_one_correct_store_without_double_work(
    video_root, reference, tmp_path, suffix, backend
):
    out = tmp_path / f"store{suffix}"
    args = [sys.executable, "-m", "fsar", *extract_args(video_root, out, "--backend", backend)]
    env = {**os.environ, **ENV}
    runs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    results = [(run.wait(), *run.communicate()) for run in runs]
    done = int((open_store(out).status == 1).sum())
    total_encoded = 0
    for code, stdout, stderr in results:
        assert "Traceback" not in stderr, stderr
        if code == 2:
            assert "being written by another fsar extract" in stderr
        else:
            assert code == 0, stderr
            total_encoded += encoded(stdout)
    assert total_encoded == done  # no video encoded twice
    assert_same_store(out, reference)


def test_a_held_lock_refuses_and_a_released_one_is_taken(tmp_path):
    out = tmp_path / "s.zarr"
    refused = pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on ")
    with writer_lock(out), refused, writer_lock(out):
        pass
    with writer_lock(out):  # released: free again
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


@pytest.mark.slow
def test_an_hdf5_run_killed_right_after_publishing_is_finished_by_the_rerun(
    video_root, reference, tmp_path, monkeypatch
):
    out = tmp_path / "store.h5"
    real_rmtree = shutil.rmtree

    def killed_here(path, *args, **kwargs):
        if Path(path) == staging_path(out):
            raise KeyboardInterrupt  # the moment between publishing and removing the staging
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("fsar.extract.runner.shutil.rmtree", killed_here)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(config_for(video_root, out, "extract.backend=hdf5"), progress=False)
    monkeypatch.undo()
    assert out.is_file() and staging_path(out).is_dir()
    result = run_fsar(*extract_args(video_root, out, "--backend", "hdf5"), env=ENV)
    assert encoded(result.stdout) == 0 and not staging_path(out).exists()
    assert_same_store(out, reference)
    mismatch = run_fsar(*extract_args(video_root, out, "--backend", "hdf5", "--frames",
                                      "uniform:4"), env=ENV, check=False)  # fmt: skip
    assert_one_line(mismatch, 2, "built differently")


# ------------------------------------------------------------------------ interrupts
@pytest.mark.slow
@pytest.mark.parametrize(
    "signum,workers",
    [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGINT, 1), (signal.SIGTERM, 1)],
)
def test_a_signal_stops_at_a_block_boundary_and_the_rerun_finishes_bitwise(
    video_root, reference, tmp_path, signum, workers
):
    """The signal goes to the whole process group, decode workers included, as a terminal's
    Ctrl-C or a scheduler's SIGTERM does."""
    out = tmp_path / "store.zarr"
    args = extract_args(video_root, out, f"extract.workers={workers}")
    run = subprocess.Popen([sys.executable, "-m", "fsar", *args], cwd=REPO,
                           env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while run.poll() is None and time.time() < deadline:
        try:
            if (open_store(out).status != 0).sum() >= 2:
                break
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.01)
    os.killpg(run.pid, signum)
    stdout, stderr = run.communicate()
    status = open_store(out).status
    assert (status == 0).any(), "the run finished before the signal"
    assert "Traceback" not in stderr, stderr
    assert "interrupted: rerun the same command to resume" in stderr
    assert run.returncode == 128 + signum  # needs cli.main to return Interrupted.exit_code
    result = run_fsar(*args, env=ENV)
    assert encoded(result.stdout) > 0
    assert_same_store(out, reference)
    assert run_fsar("cache", "verify", str(out)).returncode == 0


# ------------------------------------------------------------------------ disk full
def full_disk_after(monkeypatch, calls: int) -> None:
    """The ``calls``-th fsync of a chunk file (and every later one) fails with ENOSPC."""
    count = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        count["n"] += 1
        if count["n"] >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(backends.os, "fsync", fsync)


def test_a_full_disk_during_extraction_is_one_line_and_the_rerun_finishes(
    video_root, reference, tmp_path, monkeypatch
):
    count = {"n": 0}
    real_fsync = os.fsync
    monkeypatch.setattr(backends.os, "fsync", lambda fd: (count.__setitem__("n", count["n"] + 1),
                                                          real_fsync(fd)))  # fmt: skip
    run_extraction(config_for(video_root, tmp_path / "counted.zarr"), progress=False)
    monkeypatch.undo()
    out = tmp_path / "store.zarr"
    full_disk_after(monkeypatch, count["n"] * 3 // 4)  # among the last blocks
    with pytest.raises(StoreWriteError) as caught:
        run_extraction(config_for(video_root, out), progress=False)
    message = str(caught.value)
    assert "No space left on device" in message and str(out) in message
    assert "rerun the same command" in message and len(message.splitlines()) == 1
    monkeypatch.undo()
    assert (open_store(out).status == 0).any()
    run_extraction(config_for(video_root, out), progress=False)
    assert_same_store(out, reference)


@pytest.mark.slow
def test_a_full_disk_during_the_hdf5_export_publishes_nothing_and_the_rerun_exports(
    video_root, reference, tmp_path, monkeypatch
):
    out = tmp_path / "store.h5"

    def writer_on_a_full_disk(src, staged, read_bytes, check):
        staged.write_bytes(b"the first part of an HDF5 file")  # what the child had written
        return {"errno": errno.ENOSPC, "reason": os.strerror(errno.ENOSPC), "file": str(staged)}

    monkeypatch.setattr("fsar.cache.export.run_export_child", writer_on_a_full_disk)
    with pytest.raises(StoreWriteError, match="No space left on device"):
        run_extraction(config_for(video_root, out, "extract.backend=hdf5"), progress=False)
    monkeypatch.undo()
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    assert staging_path(out).is_dir()  # the encoded work is kept
    result = run_fsar(*extract_args(video_root, out, "--backend", "hdf5"), env=ENV)
    assert encoded(result.stdout) == 0  # nothing re-encoded: only exported
    assert_same_store(out, reference)


def disk_bytes(path: Path) -> int:
    """Bytes a file or folder takes on tmpfs (every file rounded up to 4 KiB pages)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files)


@pytest.fixture
def small_disk(tmp_path):
    """Mount a real tmpfs of a given size (root only; else the test is skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def make(size: int) -> Path:
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                              capture_output=True)  # fmt: skip
        if made.returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("suffix,backend", [(".zarr", "zarr"), (".h5", "hdf5")])
def test_a_really_full_disk_is_one_line_and_the_rerun_after_freeing_space_finishes(
    video_root, reference, small_disk, tmp_path, suffix, backend
):
    exported = tmp_path / "ref.h5"
    export_hdf5(open_store(reference), exported)
    zarr_bytes, h5_bytes = disk_bytes(reference), disk_bytes(exported)
    # Zarr: half the store fits. HDF5: the Zarr staging store fits, half the export does not.
    size = zarr_bytes // 2 if backend == "zarr" else zarr_bytes + h5_bytes // 2
    disk = small_disk(size)
    out = disk / f"store{suffix}"
    args = extract_args(video_root, out, "--backend", backend)
    full = run_fsar(*args, env=ENV, check=False)
    assert_one_line(full, 2, "No space left on device", "rerun the same command")
    assert not out.is_file() and not list(disk.glob(".*.tmp"))  # nothing half-written published
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    run_fsar(*args, env=ENV)
    assert_same_store(out, reference)


@pytest.mark.slow
# ------------------------------------------------------------------------ partial datasets
def test_missing_videos_are_counted_per_split_apart_from_failures_and_added_later(
    video_root, tmp_path
):
    root = tmp_path / "partial"
    shutil.copytree(video_root, root)
    extra = [f"push_left/gone{i}" for i in range(5)]
    with open(root / "trainlist.txt", "a") as lists:
        lists.write("\n".join(extra) + "\n")
    out = tmp_path / "store.zarr"
    first = run_fsar(*extract_args(root, out), env=ENV).stdout
    store = open_store(out)
    done = int((store.status == 1).sum())
    assert encoded(first) == done  # what this run encoded, not every listed video
    # train: 6 found + 5 missing; test: lift/missing_clip missing, 3 undecodable
    assert "train  11 listed: 6 found, 5 missing; 6 done, 0 failed" in first
    assert "test   11 listed: 10 found, 1 missing; 7 done, 3 failed" in first
    assert "3 failed to decode, 6 missing" in first
    failures = first.split("failed videos")[1].split("missing from --root")[0]
    assert "gone" not in failures and "missing_clip" not in failures
    info = run_fsar("cache", "info", str(out)).stdout
    assert "train          11        6        5        6        0        0" in info
    assert "missing from the local copy (6;" in info

    shutil.copy(root / "push_left" / "v0.mp4", root / "push_left" / "gone3.mp4")
    second = run_fsar(*extract_args(root, out), env=ENV).stdout
    assert encoded(second) == 1 and "train  11 listed: 7 found, 4 missing" in second
    assert np.sum(open_store(out).status == 1) == done + 1
