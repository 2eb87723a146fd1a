"""End-to-end extraction through the real CLI on rendered videos, vs. direct encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fsar.cache import open_store
from fsar.data.frames import parse_frame_policy, select_frames
from fsar.data.transforms import Preprocess, apply_view
from fsar.data.video import open_source
from fsar.extract.encoders import EncoderSpec, build_encoder
from fsar.extract.prompts import CLIPSPM_TEMPLATES, encode_class_names

from .conftest import assert_same_store, run_fsar

BASE_ARGS = ("--dataset", "folder", "--model", "fsar-tiny-vit", "--workers", "0")


@pytest.fixture(scope="module")
def extracted(video_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "folder.zarr"
    run_fsar(
        "extract",
        *BASE_ARGS,
        "--root",
        str(video_root),
        "--out",
        str(out),
        "--views",
        "center,flip",
        "--layers",
        "block0",
        "extract.chunk_videos=4",
    )
    return out


def test_extraction_stores_what_direct_encoding_gives(extracted, video_root):
    store = open_store(extracted)
    ids = list(store.video_ids)
    encoder = build_encoder(EncoderSpec("fsar-tiny-vit"), layers=["block0"])
    prep = Preprocess(resize=round(64 * 256 / 224), crop=64, normalize=True)
    policy = parse_frame_policy("reference_test", seq_len=8)
    for video_id, path in (
        ("push_right/v1", "push_right/v1.mp4"),
        ("lift/jpeg_clip", "lift/jpeg_clip"),
    ):
        row = ids.index(video_id)
        source = open_source(video_root / path)
        indices = select_frames(policy, source.num_frames)
        frames = source.read(indices)
        for view in ("center", "flip"):
            pixels = apply_view(frames, view, prep, seed=0)
            with torch.no_grad():
                expected = encoder.model.encode_image(pixels).numpy()
                block0 = encoder.taps.pop()["block0"].numpy()
            stored = store.read_features(view, [row])[0]
            assert store.status[row] == 1
            assert store.n_frames[row] == 8
            assert list(store.frame_index[row]) == indices
            np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
            layer = store.read_layer(view, "block0", [row])[0]
            np.testing.assert_allclose(layer.astype(np.float32), block0, rtol=2e-3, atol=2e-3)
    flip_differs = store.read_features("flip", [0])[0] != store.read_features("center", [0])[0]
    assert flip_differs.any()


def test_class_text_is_the_mean_over_the_sixteen_templates(extracted):
    store = open_store(extracted)
    assert list(store.class_names) == ["push left", "push right", "lift"]
    encoder = build_encoder(EncoderSpec("fsar-tiny-vit"))
    per_prompt = encode_class_names(
        encoder.model, encoder.tokenizer, store.class_names, CLIPSPM_TEMPLATES
    ).numpy()
    np.testing.assert_allclose(
        np.asarray(store.class_text_per_prompt), per_prompt, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(store.class_text), per_prompt.mean(1), rtol=1e-5, atol=1e-5
    )


def test_bad_videos_are_recorded_with_reasons_and_listed_by_cache_info(extracted):
    store = open_store(extracted)
    ids = list(store.video_ids)
    reasons = {
        vid: store.errors[ids.index(vid)]
        for vid in ("lift/corrupt", "lift/empty", "push_left/short", "lift/missing_clip")
    }
    for video_id in reasons:
        assert store.status[ids.index(video_id)] == 2, video_id
    assert "empty" in reasons["lift/empty"].lower()
    assert (
        "missing" in reasons["lift/missing_clip"].lower()
        or "not found" in reasons["lift/missing_clip"].lower()
    )
    assert "3" in reasons["push_left/short"] and "8" in reasons["push_left/short"]
    assert reasons["lift/corrupt"]
    done = int((np.asarray(store.status) == 1).sum())
    assert done == 13  # 12 mp4 + 1 JPEG folder
    info = run_fsar("cache", "info", str(extracted)).stdout
    for video_id in reasons:
        assert video_id in info
    assert run_fsar("cache", "verify", str(extracted)).returncode == 0


@pytest.mark.parametrize(
    "change, word",
    [
        (("--model", "fsar-tiny-rn"), "model"),
        (("extract.normalize=false",), "normalize"),
        (("--views", "center"), "views"),
    ],
)
def test_reusing_a_store_with_another_recipe_is_refused(extracted, video_root, change, word):
    args = [
        "extract",
        *BASE_ARGS,
        "--root",
        str(video_root),
        "--out",
        str(extracted),
        "--views",
        "center,flip",
        "--layers",
        "block0",
        "extract.chunk_videos=4",
    ]
    args = _replace(args, change)
    result = run_fsar(*args, check=False)
    assert result.returncode == 2
    assert word in result.stderr


def _replace(args: list[str], change: tuple[str, ...]) -> list[str]:
    args = list(args)
    if change[0].startswith("--") and change[0] in args:
        position = args.index(change[0])
        args[position + 1] = change[1]
        if change[0] == "--model":  # the other model has other layer names
            position = args.index("--layers")
            args[position + 1] = "stage1"
        return args
    return args + list(change)


@pytest.mark.slow
def test_zarr_and_hdf5_stores_hold_the_same_numbers(extracted, video_root, tmp_path):
    out = tmp_path / "folder.h5"
    run_fsar(
        "extract",
        *BASE_ARGS,
        "--root",
        str(video_root),
        "--out",
        str(out),
        "--backend",
        "hdf5",
        "--views",
        "center,flip",
        "--layers",
        "block0",
        "extract.chunk_videos=4",
    )
    zarr_store, h5_store = open_store(extracted), open_store(out)
    assert h5_store.backend == "hdf5" and zarr_store.backend == "zarr"
    assert zarr_store.layout.layer_dims and "flip" in zarr_store.layout.views
    assert_same_store(out, extracted)
    assert not list(tmp_path.glob("*.staging.zarr")), "the staging store is removed after export"
