"""The feature store on disk: round trips, Zarr == HDF5, refusal of mixed stores, crash safety."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fsar.cache.backends as backends
from fsar.cache import (
    StoreLayout,
    StoreMismatchError,
    create_store,
    export_hdf5,
    format_summary,
    open_store,
    recipe_fingerprint,
)
from fsar.cache.fingerprint import canonical_json, recipe_diff
from fsar.cache.layout import array_specs

REPO = Path(__file__).resolve().parents[1]
RECIPE = {"model": "fsar-tiny-vit", "weights": "random:0", "preprocess": {"crop": 32, "norm": True}}
ODD_IDS = ["(Rad)Schlag_die_Bank!_1", "Überschlag/ü_日本", "brush_hair/April_09_brush_hair_u_nm"]


def random_layout(rng: np.random.Generator, n: int | None = None) -> StoreLayout:
    n = int(rng.integers(1, 40)) if n is None else n
    n_classes = int(rng.integers(1, 5))
    layers = {f"block{i}": int(rng.integers(1, 6)) for i in range(int(rng.integers(0, 3)))}
    return StoreLayout(
        video_ids=tuple(f"{ODD_IDS[i % 3]}_{i}" for i in range(n)),
        class_ids=tuple(int(c) for c in rng.integers(0, n_classes, n)),
        splits=tuple(rng.choice(["train", "val", "test"], n)),
        class_names=tuple(f"class {c} ä" for c in range(n_classes)),
        t_cap=int(rng.integers(1, 7)),
        feature_dim=int(rng.integers(1, 9)),
        views=("center", "flip")[: int(rng.integers(1, 3))],
        layer_dims=layers,
        n_prompts=int(rng.integers(1, 4)),
        chunk_videos=int(rng.integers(1, 9)),
    )


def block_for(layout: StoreLayout, start: int, stop: int, seed: int, fail_every: int = 5) -> dict:
    """Deterministic write_block arguments for videos start..stop-1 (some failed)."""
    rng = np.random.default_rng([seed, start])
    b, t = stop - start, layout.t_cap
    n_frames = rng.integers(1, t + 1, b).astype(np.int32)
    failed = (np.arange(start, stop) % fail_every) == fail_every - 1
    n_frames[failed] = 0
    valid = np.arange(t)[None, :] < n_frames[:, None]  # [B, T]

    def feats(dim: int) -> np.ndarray:
        x = rng.standard_normal((b, t, dim)).astype(np.float16) + np.float16(3)
        return np.where(valid[..., None], x, np.float16(0))

    return dict(
        features={v: feats(layout.feature_dim) for v in layout.views},
        layers={v: {k: feats(d) for k, d in layout.layer_dims.items()} for v in layout.views}
        if layout.layer_dims
        else {},
        frame_index=np.where(valid, np.cumsum(rng.integers(1, 4, (b, t)), axis=1), -1),
        n_frames=n_frames,
        status=np.where(failed, 2, 1).astype(np.uint8),
        errors=[f"cannot decode vidéo {start + i}" if f else "" for i, f in enumerate(failed)],
    )


def fill_store(store, seed: int) -> None:
    lay = store.layout
    blocks = store.blocks()
    for i in np.random.default_rng(seed).permutation(len(blocks)):  # any order
        store.write_block(*blocks[i], **block_for(lay, *blocks[i], seed))
    rng = np.random.default_rng(seed + 1)
    per_prompt = rng.standard_normal((lay.n_classes, lay.n_prompts, lay.feature_dim))
    store.write_classes(per_prompt.mean(1), per_prompt.astype(np.float32))


def all_arrays(store) -> dict[str, np.ndarray]:
    return {s.name: store._arrays.read(s.name) for s in array_specs(store.layout)}


def assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("backend,suffix", [("zarr", ".zarr"), ("hdf5", ".h5")])
def test_random_sized_stores_round_trip_exactly(tmp_path, backend, suffix):
    rng = np.random.default_rng(10)
    for trial in range(6):
        layout = random_layout(rng)
        path = tmp_path / f"s{trial}{suffix}"
        store = create_store(path, layout, RECIPE, backend=backend)
        fill_store(store, seed=trial)
        store.close()
        store = open_store(path)
        assert store.backend == backend and store.layout == layout
        assert list(store.video_ids) == list(layout.video_ids)
        assert store.splits.tolist() == list(layout.splits)
        assert store.class_ids.dtype == np.int32 and store.class_ids.tolist() == list(
            layout.class_ids
        )
        for start, stop in store.blocks():
            want = block_for(layout, start, stop, trial)
            rows = np.arange(start, stop)
            for view in layout.views:
                assert np.array_equal(store.read_features(view, rows), want["features"][view])
                for name in layout.layer_dims:
                    got = store.read_layer(view, name, rows)
                    assert np.array_equal(got, want["layers"][view][name])
            assert np.array_equal(store.frame_index[start:stop], want["frame_index"])
            assert np.array_equal(store.n_frames[start:stop], want["n_frames"])
            assert np.array_equal(store.status[start:stop], want["status"])
            assert store.errors[start:stop] == want["errors"]
        assert store.class_text.shape == (layout.n_classes, layout.feature_dim)
        assert np.allclose(store.class_text, store.class_text_per_prompt.mean(1), atol=1e-6)
        assert store.pending_blocks() == []
        store.close()


def test_reading_indices_in_any_order_with_repeats_matches_reading_everything(tmp_path):
    layout = random_layout(np.random.default_rng(3), n=30)
    store = create_store(tmp_path / "s.zarr", layout, RECIPE)
    fill_store(store, seed=3)
    everything = store.read_features("center")
    picks = np.array([29, 3, 3, 0, 17, 16, 15])
    assert np.array_equal(store.read_features("center", picks), everything[picks])
    mask = np.arange(30) % 4 == 0
    assert np.array_equal(store.read_features("center", mask), everything[mask])
    assert store.read_features("center", []).shape == (0, layout.t_cap, layout.feature_dim)
    for split in ("train", "val", "test"):
        in_split = np.array(layout.splits) == split
        assert np.array_equal(store.split_indices(split, done_only=False), np.flatnonzero(in_split))
        done = np.flatnonzero(in_split & (store.status == 1))
        assert np.array_equal(store.split_indices(split), done)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        store.split_indices("dev")
    with pytest.raises(IndexError, match="0..29"):
        store.read_features("center", [30])
    with pytest.raises(KeyError, match="cached views"):
        store.read_features("crop0")


def test_zarr_and_hdf5_written_directly_hold_identical_arrays_and_attributes(tmp_path):
    layout = random_layout(np.random.default_rng(4), n=23)
    stores = [create_store(tmp_path / name, layout, RECIPE, backend=kind)
              for name, kind in (("a.zarr", "zarr"), ("a.h5", "hdf5"))]  # fmt: skip
    for store in stores:
        fill_store(store, seed=4)
    assert_same_arrays(all_arrays(stores[0]), all_arrays(stores[1]))
    assert stores[0].attrs == stores[1].attrs
    assert stores[0].summary().counts == stores[1].summary().counts


@pytest.mark.parametrize("read_bytes", [1, 64 * 2**20])  # one block per copy / all at once
def test_export_to_hdf5_copies_every_array_and_attribute_exactly(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr("fsar.cache.store.READ_BYTES", read_bytes)
    layout = random_layout(np.random.default_rng(5), n=41)
    src = create_store(tmp_path / "src.zarr", layout, RECIPE)
    fill_store(src, seed=5)
    dest = tmp_path / "out.h5"
    export_hdf5(src, dest)
    out = open_store(dest)
    assert out.backend == "hdf5" and out.fingerprint == src.fingerprint
    assert out.attrs == src.attrs and out.layout == src.layout
    assert_same_arrays(all_arrays(src), all_arrays(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "src.zarr"]  # no temp left
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hdf5(src, dest)


def test_export_refuses_a_store_with_pending_videos_unless_allowed(tmp_path):
    layout = random_layout(np.random.default_rng(6), n=20)
    src = create_store(tmp_path / "src.zarr", layout, RECIPE)
    with pytest.raises(ValueError, match="20 pending videos"):
        export_hdf5(src, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()
    export_hdf5(src, tmp_path / "out.h5", allow_pending=True)
    assert open_store(tmp_path / "out.h5").pending_blocks() == src.pending_blocks()


def test_reopening_with_the_same_recipe_and_layout_resumes_the_existing_store(tmp_path):
    layout = random_layout(np.random.default_rng(7), n=12)
    store = create_store(tmp_path / "s.zarr", layout, RECIPE)
    first = store.blocks()[0]
    store.write_block(*first, **block_for(layout, *first, seed=7))
    again = create_store(tmp_path / "s.zarr", layout, dict(reversed(RECIPE.items())))
    assert again.writable and first not in again.pending_blocks()


def test_reopening_with_a_different_recipe_is_refused_with_the_differing_fields(tmp_path):
    layout = random_layout(np.random.default_rng(8), n=12)
    create_store(tmp_path / "s.zarr", layout, RECIPE).close()
    other = {**RECIPE, "weights": "sha256:abc", "preprocess": {"crop": 32, "norm": False}}
    with pytest.raises(StoreMismatchError) as err:
        create_store(tmp_path / "s.zarr", layout, other)
    message = str(err.value)
    assert "weights: 'random:0' (store) vs 'sha256:abc' (requested)" in message
    assert "preprocess.norm: True (store) vs False (requested)" in message
    assert "model" not in message.split("\n", 1)[1].split("Write")[0]  # unchanged keys unlisted
    assert "new --out path" in message and "delete" in message


def test_reopening_with_a_different_video_list_is_refused(tmp_path):
    rng = np.random.default_rng(9)
    layout = random_layout(rng, n=12)
    create_store(tmp_path / "s.h5", layout, RECIPE, backend="hdf5").close()
    ids = list(layout.video_ids)
    ids[5] = "someone_else/video"
    changed = StoreLayout(**{**layout.__dict__, "video_ids": tuple(ids)})
    with pytest.raises(StoreMismatchError, match="video_ids: first difference at index 5"):
        create_store(tmp_path / "s.h5", changed, RECIPE, backend="hdf5")
    with pytest.raises(StoreMismatchError, match="existing hdf5 store but backend='zarr'"):
        create_store(tmp_path / "s.h5", layout, RECIPE, backend="zarr")


def test_processes_racing_to_create_one_store_all_get_the_same_store(tmp_path):
    layout = random_layout(np.random.default_rng(11), n=30)
    results, errors = [], []

    def create() -> None:
        try:
            results.append(create_store(tmp_path / "s.zarr", layout, RECIPE).fingerprint)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [recipe_fingerprint(RECIPE)] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # losers cleaned up their staging


def test_pending_blocks_shrink_as_blocks_are_written_and_failed_videos_can_be_retried(tmp_path):
    layout = random_layout(np.random.default_rng(12), n=37)
    layout = StoreLayout(**{**layout.__dict__, "chunk_videos": 8})
    store = create_store(tmp_path / "s.zarr", layout, RECIPE)
    blocks = store.blocks()
    assert blocks == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]
    assert store.pending_blocks() == blocks
    for block in (blocks[1], blocks[4]):
        store.write_block(*block, **block_for(layout, *block, seed=1, fail_every=100))
    assert open_store(store.path).pending_blocks() == [blocks[0], blocks[2], blocks[3]]
    block = block_for(layout, *blocks[0], seed=1, fail_every=3)  # videos 2 and 5 fail
    store.write_block(*blocks[0], **block)
    assert store.pending_blocks() == [blocks[2], blocks[3]]
    assert store.pending_blocks(retry_failed=True) == [blocks[0], blocks[2], blocks[3]]
    with pytest.raises(ValueError, match="not chunk-aligned"):
        store.write_block(4, 12, **block_for(layout, 4, 12, seed=1))
    store.mark_pending(*blocks[1])
    assert store.pending_blocks() == [blocks[1], blocks[2], blocks[3]]


def test_a_read_only_store_refuses_writes(tmp_path):
    layout = random_layout(np.random.default_rng(13), n=5)
    create_store(tmp_path / "s.zarr", layout, RECIPE).close()
    store = open_store(tmp_path / "s.zarr")
    with pytest.raises(PermissionError, match="open_store"):
        store.write_block(0, 5, **block_for(layout, 0, 5, seed=0))
    with pytest.raises(ValueError, match="valid: \\('r', 'r\\+'\\)"):
        open_store(tmp_path / "s.zarr", "w")


def test_opening_something_that_is_not_a_store_says_so(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a Zarr v3 store"):
        open_store(tmp_path / "dir")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        open_store(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no feature store"):
        open_store(tmp_path / "missing.zarr")


def test_class_text_is_unavailable_until_written(tmp_path):
    layout = random_layout(np.random.default_rng(14), n=5)
    store = create_store(tmp_path / "s.zarr", layout, RECIPE)
    assert not store.has_text
    with pytest.raises(RuntimeError, match="never written"):
        _ = store.class_text
    with pytest.raises(ValueError, match="classes/text must have shape"):
        store.write_classes(np.zeros((9, 1)), np.zeros((9, 1, 1)))
    assert "class text embeddings (classes/text) were never written" in store.verify()


def test_fingerprint_ignores_key_order_and_container_type_but_not_values():
    a = {"model": "RN50", "views": ["center", "flip"], "pre": {"crop": 224, "resize": 256}}
    b = {"pre": {"resize": 256, "crop": 224}, "views": ("center", "flip"), "model": "RN50"}
    assert recipe_fingerprint(a) == recipe_fingerprint(b)
    assert recipe_fingerprint(a) != recipe_fingerprint({**a, "views": ["flip", "center"]})
    assert canonical_json(a).startswith('{"model":"RN50","pre":{"crop":224')
    assert recipe_diff(a, {**a, "pre": {"crop": 224}}) == ["pre.resize: 256 (store) vs "
                                                           "'<absent>' (requested)"]  # fmt: skip
    with pytest.raises(ValueError):
        recipe_fingerprint({"lr": float("nan")})
    with pytest.raises(TypeError, match=r"recipe.pre.path has type PosixPath"):
        recipe_fingerprint({"pre": {"path": Path("x")}})


def test_library_versions_are_recorded_but_not_part_of_the_fingerprint(tmp_path):
    layout = random_layout(np.random.default_rng(15), n=4)
    store = create_store(tmp_path / "s.zarr", layout, RECIPE)
    assert store.attrs["versions"]["zarr"] and store.fingerprint == recipe_fingerprint(RECIPE)
    assert store.recipe == {"model": "fsar-tiny-vit", "preprocess": {"crop": 32, "norm": True},
                            "weights": "random:0"}  # fmt: skip


# ------------------------------------------------------------------------ crash safety
def chunk_files(store_path: Path, array: str) -> list[Path]:
    return sorted(p for p in (store_path / array / "c").rglob("*") if p.is_file())


def test_every_zarr_file_is_written_through_the_atomic_durable_writer(tmp_path, monkeypatch):
    written = []
    original = backends._durable_put
    monkeypatch.setattr(backends, "_durable_put", lambda p, d: (written.append(p), original(p, d)))
    layout = random_layout(np.random.default_rng(16), n=16)
    fill_store(create_store(tmp_path / "s.zarr", layout, RECIPE), seed=16)
    # files written while building the store in its staging folder count under the final name
    via_writer = {Path("s.zarr", *p.relative_to(tmp_path).parts[1:]) for p in written}
    on_disk = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert len(on_disk) > 20 and on_disk <= via_writer
    assert any("features" in p.parts for p in on_disk)
    assert not [p for p in on_disk if p.name.endswith(".partial")]


CHILD = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from fsar.cache import open_store
from test_store import block_for
store, mode = open_store(sys.argv[1], "r+"), sys.argv[2]
if mode == "die_before_status":
    write = store._arrays.write
    def dying_write(name, start, value):
        if name == "videos/status" and value.any():
            os.kill(os.getpid(), signal.SIGKILL)
        write(name, start, value)
    store._arrays.write = dying_write
for start, stop in store.pending_blocks(retry_failed=mode == "die_before_status"):
    store.write_block(start, stop, **block_for(store.layout, start, stop, seed=int(sys.argv[3])))
    print(start, flush=True)
"""


def killed_child(path: Path, mode: str, seed: int) -> bool:
    """Run the child to its end; True when it died of SIGKILL."""
    with run_child(path, mode, seed) as child:
        child.communicate()
    return child.returncode == -signal.SIGKILL


def run_child(path: Path, mode: str, seed: int) -> subprocess.Popen:
    code = CHILD.format(repo=str(REPO), tests=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", code, str(path), mode, str(seed)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


def test_a_kill_after_the_data_but_before_the_status_leaves_the_videos_pending(tmp_path):
    layout = random_layout(np.random.default_rng(17), n=10)
    layout = StoreLayout(**{**layout.__dict__, "chunk_videos": 10})
    path = tmp_path / "s.zarr"
    store = create_store(path, layout, RECIPE)
    assert killed_child(path, "die_before_status", seed=1)
    want = block_for(layout, 0, 10, seed=1)
    assert np.array_equal(store.read_features("center"), want["features"]["center"])  # data in
    assert store.pending_blocks() == [(0, 10)] and not store.status.any()  # but not done
    store.write_block(0, 10, **want)
    # rewriting a block of done videos: killed before the final status -> pending, not done
    assert killed_child(path, "die_before_status", seed=2)
    assert not store.status.any()
    store.write_block(0, 10, **block_for(layout, 0, 10, seed=2))
    assert store.pending_blocks() == []


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_done_video_with_wrong_or_torn_data(tmp_path):
    rng = np.random.default_rng(18)
    layout = StoreLayout(
        video_ids=tuple(f"v{i}" for i in range(96)), class_ids=(0,) * 96,
        splits=("test",) * 96, class_names=("a",), t_cap=16, feature_dim=512,
        views=("center", "flip"), layer_dims={"block1": 256}, chunk_videos=4,
    )  # fmt: skip
    path = tmp_path / "s.zarr"
    store = create_store(path, layout, RECIPE)
    kills = 0
    while store.pending_blocks():
        with run_child(path, "write", seed=5) as child:
            for _ in range(int(rng.integers(1, 10))):
                child.stdout.readline()
            time.sleep(float(rng.uniform(0, 0.05)))
            child.send_signal(signal.SIGKILL)
            child.communicate()
        kills += child.returncode == -signal.SIGKILL
        everything = all_arrays(store)  # no chunk is torn: every read succeeds
        status = everything["videos/status"]
        for start, stop in store.blocks():
            done = status[start:stop] != 0
            want = block_for(layout, start, stop, seed=5)
            got = everything["features/flip"][start:stop]
            assert np.array_equal(got[done], want["features"]["flip"][done])
            got = everything["layers/center/block1"][start:stop]
            assert np.array_equal(got[done], want["layers"]["center"]["block1"][done])
            assert np.array_equal(status[start:stop][done], want["status"][done])
    assert kills >= 1
    chunks = [p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".partial")]
    assert all(p.stat().st_size > 0 for p in chunks)  # killed writes leave only .partial files


@pytest.mark.parametrize("read_bytes", [1, 64 * 2**20])  # one block per read / all at once
def test_a_truncated_data_chunk_is_reported_and_its_block_can_be_redone(
    tmp_path, monkeypatch, read_bytes
):
    monkeypatch.setattr("fsar.cache.store.READ_BYTES", read_bytes)
    layout = random_layout(np.random.default_rng(19), n=12)
    layout = StoreLayout(**{**layout.__dict__, "chunk_videos": 4})
    path = tmp_path / "s.zarr"
    store = create_store(path, layout, RECIPE)
    fill_store(store, seed=19)
    assert store.verify() == []
    victim = chunk_files(path, "features/center")[1]  # videos 4..7
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    problems = store.verify()
    assert len(problems) == 1 and problems[0].startswith("videos 4..7: unreadable chunk")
    with pytest.raises(Exception):  # noqa: B017 - the codec's own error type
        store.read_features("center", [5])
    store.mark_pending(4, 8)
    assert store.pending_blocks() == [(4, 8)]
    store.write_block(4, 8, **block_for(layout, 4, 8, seed=19))
    assert store.verify() == []


def test_a_truncated_status_chunk_counts_as_pending_not_done(tmp_path):
    layout = random_layout(np.random.default_rng(20), n=12)
    layout = StoreLayout(**{**layout.__dict__, "chunk_videos": 4})
    path = tmp_path / "s.zarr"
    store = create_store(path, layout, RECIPE)
    fill_store(store, seed=20)
    victim = chunk_files(path, "videos/status")[2]  # videos 8..11
    victim.write_bytes(victim.read_bytes()[:3])
    with pytest.warns(UserWarning, match="videos 8..11 is unreadable"):
        assert store.pending_blocks() == [(8, 12)]
    store.write_block(8, 12, **block_for(layout, 8, 12, seed=20))  # replaces the damaged chunk
    assert store.pending_blocks() == [] and store.verify() == []


def test_a_leftover_temporary_chunk_from_a_killed_write_is_ignored(tmp_path):
    layout = random_layout(np.random.default_rng(21), n=8)
    layout = StoreLayout(**{**layout.__dict__, "chunk_videos": 4})
    path = tmp_path / "s.zarr"
    store = create_store(path, layout, RECIPE)
    store.write_block(0, 4, **block_for(layout, 0, 4, seed=21))
    chunk = chunk_files(path, "features/center")[0]
    (chunk.parent / f".{chunk.name}.0123abcd.partial").write_bytes(b"\x28\xb5half a chunk")
    assert np.array_equal(store.read_features("center", range(4)),
                          block_for(layout, 0, 4, seed=21)["features"]["center"])  # fmt: skip
    assert store.pending_blocks() == [(4, 8)]


# ------------------------------------------------------------------------ summary and verify
def test_summary_counts_splits_and_statuses_and_lists_failures_with_reasons(tmp_path):
    layout = random_layout(np.random.default_rng(22), n=31)
    store = create_store(tmp_path / "s.zarr", layout, RECIPE)
    fill_store(store, seed=22)
    store.mark_pending(*store.blocks()[0])
    summary = store.summary()
    status, splits = store.status, np.array(layout.splits)
    for split in ("train", "val", "test"):
        if split in splits:
            want = {n: int(np.sum((splits == split) & (status == c)))
                    for c, n in ((0, "pending"), (1, "done"), (2, "failed"))}  # fmt: skip
            assert summary.counts[split] == {**want, "missing": 0}  # no "missing:" reason here
    failed = [i for i in range(31) if status[i] == 2]
    assert len(failed) >= 4 and summary.failures == tuple(
        (layout.video_ids[i], f"cannot decode vidéo {i}") for i in failed
    )
    assert summary.frames_cached == int(store.n_frames[status == 1].sum())
    assert summary.size_bytes > 0 and summary.fingerprint == recipe_fingerprint(RECIPE)
    text = format_summary(summary)
    for i in failed:
        assert f"{layout.video_ids[i]}: cannot decode vidéo {i}" in text
    assert "preprocess.crop: 32" in text and summary.fingerprint in text
    assert "... and" in format_summary(summary, max_failures=1)


def test_verify_names_done_videos_with_missing_or_inconsistent_data(tmp_path):
    layout = StoreLayout(
        video_ids=tuple(f"v{i}" for i in range(8)), class_ids=(0,) * 8, splits=("train",) * 8,
        class_names=("a",), t_cap=4, feature_dim=3, chunk_videos=4,
    )  # fmt: skip
    store = create_store(tmp_path / "s.h5", layout, RECIPE, backend="hdf5")
    fill_store(store, seed=23)
    assert store.verify() == []
    arrays = store._arrays
    features = store.read_features("center", range(4))
    features[0] = 0  # v0: all-zero features
    features[1, 0, 0] = np.inf  # v1: non-finite
    arrays.write("features/center", 0, features)
    arrays.write("videos/n_frames", 2, np.array([0], np.int32))  # v2: no frames
    index = store.frame_index[4:8]
    index[2, -1] = 99 if store.n_frames[6] < 4 else -1  # v6: index disagrees with n_frames
    arrays.write("videos/frame_index", 4, index)
    assert store.status[4] == 2  # v4 failed (block_for fails every 5th video)
    arrays.write("videos/error", 4, np.array([""], object))  # v4 failed: no reason
    problems = "\n".join(store.verify())
    assert "done videos with all-zero frames in features/center: 'v0'" in problems
    assert "done videos with non-finite features/center: 'v1'" in problems
    assert "n_frames outside 1..T_cap: 'v2'" in problems
    assert "frame_index disagrees with n_frames: 'v2', 'v6'" in problems
    assert "failed videos without an error message: 'v4'" in problems
