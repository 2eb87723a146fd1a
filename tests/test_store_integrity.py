"""A damaged store is never scored (issue 12): fsar eval / train refuse it with one line naming
the store and array, and fsar cache verify finds every kind of damage, without a traceback.

One small store of rendered demo videos is extracted once; every test damages a copy of it the
way a disk, a copy or a person does: a NaN in one video, a deleted chunk file of each kind of
array, one flipped byte, a truncated HDF5 export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fsar.cache import export_hdf5, open_store
from fsar.config import load_config
from fsar.data.synthetic import DemoSpec, render_demo_dataset
from fsar.extract.runner import run_extraction

from .conftest import run_fsar

CHUNK = 4  # videos per chunk of the test store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """8 classes x 4 videos: 8 train, 8 val, 16 test videos in chunks of 4."""
    base = tmp_path_factory.mktemp("integrity")
    spec = DemoSpec(
        n_pairs=4, train_pairs=1, val_pairs=1, videos_per_class=4, n_frames=10,
        frames_jitter=1, size=32,
    )  # fmt: skip
    render_demo_dataset(base / "videos", spec)
    run_extraction(demo_config(base / "videos", base / "store.zarr"), progress=False)
    return base / "store.zarr"


def demo_config(root: Path, out: Path):
    keys = ["dataset.name=demo", f"dataset.root={root}", "model.name=fsar-tiny-vit",
            f"extract.out={out}", "extract.workers=0", f"extract.chunk_videos={CHUNK}"]  # fmt: skip
    return load_config([], keys)


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "store.zarr"))


def eval_store(store: Path, tmp_path: Path, *extra: str):
    return run_fsar(
        "eval", "--store", str(store), "--head", "proto_mean", "--way", "3", "--shot", "1",
        "--episodes", "30", "--out", str(tmp_path / "result.json"), "--device", "cpu", *extra,
        check=False,
    )  # fmt: skip


def first_test_row(store: Path) -> tuple[int, str]:
    opened = open_store(store)
    row = int(opened.split_indices("test")[0])
    return row, opened.video_ids[row]


def chunk_file(store: Path, array: str, row: int) -> Path:
    """The file of the chunk holding ``row`` (Zarr v3 default keys: c/<i>/0/...)."""
    meta = json.loads((store / array / "zarr.json").read_text())
    chunk_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    return store.joinpath(array, "c", str(row // chunk_rows), *["0"] * (len(meta["shape"]) - 1))


def assert_one_line_refusal(result, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_the_undamaged_store_is_scored_and_verifies(pristine, tmp_path):
    result = eval_store(pristine, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3-way 1-shot, 30 episodes" in result.stdout
    assert run_fsar("cache", "verify", str(pristine)).returncode == 0


def test_one_nan_frame_in_one_test_video_refuses_eval_naming_the_video(copy, tmp_path):
    row, video = first_test_row(copy)
    store = open_store(copy, "r+")
    start = row // CHUNK * CHUNK
    block = store.read_features("center", range(start, start + CHUNK))
    block[row - start, 0, 3] = np.nan
    store._arrays.write("features/center", start, block)
    result = eval_store(copy, tmp_path)
    assert_one_line_refusal(
        result, str(copy), "features/center", "non-finite", repr(video), "fsar cache verify"
    )
    verify = run_fsar("cache", "verify", str(copy), check=False)
    assert verify.returncode == 1 and "non-finite features/center" in verify.stdout
    assert video in verify.stdout


@pytest.mark.slow
@pytest.mark.parametrize("array", ["features/center", "videos/n_frames", "videos/status"])
def test_a_deleted_chunk_of_test_videos_refuses_eval_instead_of_reading_fill_values(
    copy, tmp_path, array
):
    row, _ = first_test_row(copy)
    chunk_file(copy, array, row).unlink()
    result = eval_store(copy, tmp_path)
    assert_one_line_refusal(result, str(copy), array, "missing", "fsar cache verify")


def test_rerunning_the_extraction_re_encodes_the_blocks_of_deleted_chunks(copy, pristine):
    from .conftest import assert_same_store

    rows = open_store(copy).split_indices("test")
    chunk_file(copy, "features/center", int(rows[0])).unlink()
    chunk_file(copy, "videos/status", int(rows[CHUNK])).unlink()
    result = run_extraction(demo_config(pristine.parent / "videos", copy), progress=False)
    assert result.encoded_now == 2 * CHUNK
    assert_same_store(copy, pristine)
    assert open_store(copy).verify() == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "array,command", [("videos/class_id", "train"), ("videos/split", "eval"), ("videos/id", "eval")]
)
def test_a_deleted_class_split_or_id_chunk_is_named_by_train_and_eval(
    copy, tmp_path, array, command
):
    chunk_file(copy, array, 0).unlink()  # one chunk holds every video
    if command == "train":
        result = run_fsar(
            "train", "--store", str(copy), "--out", str(tmp_path / "run"), "--head",
            "proto_mean", "--steps", "1", "--device", "cpu", check=False,
        )  # fmt: skip
    else:
        result = eval_store(copy, tmp_path)
    assert_one_line_refusal(result, str(copy), array, "missing")


@pytest.mark.slow
def test_verify_names_every_deleted_chunk_of_every_kind_of_array(copy, pristine):
    rows = open_store(copy).split_indices("test")
    arrays = ["features/center", "videos/n_frames", "videos/status", "videos/frame_index"]
    for i, array in enumerate(arrays):  # each in another chunk of test videos
        chunk_file(copy, array, int(rows[i * CHUNK])).unlink()
    chunk_file(copy, "classes/text", 0).unlink()
    verify = run_fsar("cache", "verify", str(copy), check=False)
    assert verify.returncode == 1 and not verify.stderr, verify.stderr
    for array in [*arrays, "classes/text"]:
        assert f"{array}: chunk" in verify.stdout, (array, verify.stdout)
    for array in ("videos/class_id", "videos/split", "videos/id"):  # read when the store opens
        chunk_file(copy, array, 0).unlink()
        verify = run_fsar("cache", "verify", str(copy), check=False)
        assert verify.returncode == 1 and not verify.stderr, verify.stderr
        assert f"{array} has missing chunk(s)" in verify.stdout, verify.stdout
        shutil.copy(chunk_file(pristine, array, 0), chunk_file(copy, array, 0))


def test_a_flipped_byte_names_store_array_and_chunk(copy, tmp_path):
    row, _ = first_test_row(copy)
    victim = chunk_file(copy, "features/center", row)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    chunk = row // CHUNK
    result = eval_store(copy, tmp_path)
    assert_one_line_refusal(
        result, str(copy), f"features/center chunk {chunk}", "fsar cache verify"
    )
    verify = run_fsar("cache", "verify", str(copy), check=False)
    assert verify.returncode == 1
    assert f"videos {chunk * CHUNK}..{chunk * CHUNK + CHUNK - 1}: unreadable chunk" in verify.stdout


@pytest.mark.slow
def test_a_truncated_hdf5_store_is_reported_not_crashed_on(pristine, tmp_path):
    h5 = tmp_path / "store.h5"
    export_hdf5(open_store(pristine), h5)
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size * 2 // 3])
    verify = run_fsar("cache", "verify", str(h5), check=False)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr, verify.stderr
    assert str(h5) in verify.stdout and "cannot read" in verify.stdout
    assert_one_line_refusal(eval_store(h5, tmp_path), str(h5), "cannot read")


def test_a_flipped_byte_in_an_hdf5_chunk_fails_its_checksum(pristine, tmp_path):
    h5 = tmp_path / "store.h5"
    export_hdf5(open_store(pristine), h5)
    store = open_store(h5)
    offset = store._arrays._file["features/center"].id.get_chunk_info(1).byte_offset
    store.close()
    with open(h5, "r+b") as f:  # the second chunk: videos 4..7
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    verify = run_fsar("cache", "verify", str(h5), check=False)
    assert verify.returncode == 1 and "videos 4..7: unreadable chunk" in verify.stdout


@pytest.mark.parametrize("kind", ["numpy float16", "float16", "bfloat16", "float32"])
def test_the_load_check_finds_non_finite_rows_in_every_step_and_dtype(monkeypatch, kind):
    """The non-finite check steps over rows by bytes; a bad row in any step is named."""
    from types import SimpleNamespace

    import torch

    from fsar.cache import integrity

    rows_per_step = 3
    values = np.ones((10, 4, 8), dtype=np.float32)  # 10 videos, T=4, D=8
    monkeypatch.setattr(integrity, "FINITE_BYTES", rows_per_step * 4 * 8 * 4)
    values[1, 2, 3] = np.nan  # first step
    values[7, 0, 0] = -np.inf  # third step
    if kind == "numpy float16":
        data = values.astype(np.float16)
    else:
        data = torch.from_numpy(values).to(getattr(torch, kind))
    store = SimpleNamespace(path="store.zarr", video_ids=[f"v{i}" for i in range(20)])
    rows = np.arange(10, 20)  # row i of the values is store row 10 + i
    with pytest.raises(integrity.DamagedStoreError, match=r"in 2 done 'test'.*'v11', 'v17'"):
        integrity.require_finite(store, "features/center", data, rows, "'test'")
    integrity.require_finite(store, "features/center", data[2:7], rows[2:7], "'test'")
