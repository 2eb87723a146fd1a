"""Views: shapes, value ranges, exact crops, determinism, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsar.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    Preprocess,
    apply_view,
    parse_views,
    view_seed,
)


def random_video(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("view", ["center", "flip", "crop0", "crop3"])
@pytest.mark.parametrize(("h", "w"), [(120, 200), (200, 120), (64, 64)])
def test_every_view_gives_float_frames_of_the_crop_size(view, h, w):
    out = apply_view(random_video(5, h, w), view, Preprocess(resize=56, crop=48), seed=11)
    assert out.shape == (5, 3, 48, 48) and out.dtype == torch.float32
    assert out.is_contiguous()


def test_unnormalised_frames_lie_in_unit_range_and_normalisation_uses_clip_statistics():
    frames = random_video(4, 90, 130)
    raw = apply_view(frames, "center", Preprocess(64, 64, normalize=False))
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0
    assert float(raw.max()) > 0.9 and float(raw.min()) < 0.1
    normalised = apply_view(frames, "center", Preprocess(64, 64, normalize=True))
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, (raw - mean) / std)


def test_center_view_without_resizing_is_the_exact_middle_square():
    frames = random_video(3, 64, 96)  # shorter side already 64: no resampling
    out = apply_view(frames, "center", Preprocess(resize=64, crop=64, normalize=False))
    expected = torch.from_numpy(frames[:, :, 16:80]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(out, expected)


def test_resize_scales_the_shorter_side_and_keeps_the_aspect_ratio():
    frames = np.zeros((1, 120, 200, 3), np.uint8)
    frames[:, :, 100:] = 255  # right half white: the edge sits at the middle after any resize
    frames[:, :, :, 1] = 0
    out = apply_view(frames, "center", Preprocess(resize=60, crop=60, normalize=False))
    row = out[0, 0, 30]  # red channel of the middle row: 0 then 1, edge at column 30
    assert float(row[:28].max()) < 0.02 and float(row[32:].min()) > 0.98
    # 120x200 -> 60x100, crop columns 20..80 of the resized frame: the edge is at its middle
    wide = apply_view(frames, "center", Preprocess(resize=60, crop=40, normalize=False))
    assert float(wide[0, 0, 20, :18].max()) < 0.02 and float(wide[0, 0, 20, 22:].min()) > 0.98


def test_flip_view_equals_the_mirrored_center_view():
    frames = random_video(6, 100, 140)
    prep = Preprocess(resize=72, crop=64)
    center = apply_view(frames, "center", prep)
    assert torch.equal(apply_view(frames, "flip", prep), center.flip(-1))


def test_a_crop_view_is_one_window_shared_by_all_frames():
    frames = random_video(4, 64, 100)  # no resampling at resize=64: crops are exact windows
    prep = Preprocess(resize=64, crop=48, normalize=False)
    out = apply_view(frames, "crop0", prep, seed=view_seed(0, "a/b", "crop0"))
    source = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # [T, 3, 64, 100]
    windows = [
        (top, left)
        for top in range(64 - 48 + 1)
        for left in range(100 - 48 + 1)
        if torch.equal(source[:, :, top : top + 48, left : left + 48], out)
    ]
    assert len(windows) == 1


def test_crop_positions_depend_on_the_seed_only():
    frames = random_video(2, 80, 120)
    prep = Preprocess(resize=80, crop=32)
    first = apply_view(frames, "crop0", prep, seed=5)
    assert torch.equal(first, apply_view(frames, "crop0", prep, seed=5))
    assert torch.equal(first, apply_view(frames, "crop7", prep, seed=5))
    others = [apply_view(frames, "crop0", prep, seed=s) for s in range(6, 12)]
    assert not all(torch.equal(first, other) for other in others)


def test_the_same_input_gives_bitwise_the_same_output():
    frames = random_video(8, 240, 320)
    prep = Preprocess()
    for view in ("center", "flip", "crop1"):
        assert torch.equal(apply_view(frames, view, prep, 3), apply_view(frames, view, prep, 3))


def test_numpy_and_torch_inputs_give_the_same_output():
    frames = random_video(3, 70, 90)
    prep = Preprocess(resize=64, crop=56)
    from_numpy = apply_view(frames, "center", prep)
    assert torch.equal(from_numpy, apply_view(torch.from_numpy(frames), "center", prep))
    read_only = frames.copy()
    read_only.flags.writeable = False
    assert torch.equal(from_numpy, apply_view(read_only, "center", prep))


def test_bad_frames_and_bad_views_are_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        apply_view(np.zeros((2, 8, 8, 3), np.float32), "center", Preprocess(8, 8))
    with pytest.raises(ValueError, match="'zoom'.*'center', 'flip', 'crop<k>'"):
        apply_view(random_video(1, 8, 8), "zoom", Preprocess(8, 8))


def test_preprocess_refuses_impossible_settings():
    with pytest.raises(ValueError, match="crop=256, resize=224"):
        Preprocess(resize=224, crop=256)
    with pytest.raises(ValueError, match="'lanczos'.*bicubic, bilinear, nearest"):
        Preprocess(interpolation="lanczos")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("center", ("center",)),
        ("center,flip,crop0,crop1", ("center", "flip", "crop0", "crop1")),
        (" flip , center ", ("center", "flip")),
        (["center", "crop12"], ("center", "crop12")),
    ],
)
def test_view_lists_parse_with_center_first(spec, expected):
    assert parse_views(spec) == expected


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("flip,crop0", "lack 'center'"),
        ("center,zoom", "unknown view 'zoom'"),
        ("center,crop", "unknown view 'crop'"),
        ("center,flip,flip", "listed twice: \\['flip'\\]"),
    ],
)
def test_bad_view_lists_name_the_problem_and_the_valid_forms(spec, problem):
    with pytest.raises(ValueError, match=f"{problem}.*valid: 'center', 'flip', 'crop<k>'"):
        parse_views(spec)


def test_view_seeds_differ_per_video_view_and_base_seed():
    seeds = {
        view_seed(base, video, view)
        for base in (0, 1)
        for video in ("a/x", "a/y")
        for view in ("crop0", "crop1")
    }
    assert len(seeds) == 8
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_view_seeds_are_pinned_so_cached_crops_never_change():
    # Crop views cached by older runs must stay reproducible: the seed of a (base seed, video,
    # view) is part of the store's contract, recorded here once (sha256, independent of process,
    # PYTHONHASHSEED, rank and order).
    assert view_seed(3, "cls/vid", "crop2") == 1482070826089137955
    assert view_seed(0, "brush_hair/April_09", "crop0") == 7062377420768774478
