"""Video writing and the synthetic demo dataset (SPEC 8)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fsar.data.synthetic import (
    MOTIONS,
    DemoSpec,
    demo_pairs,
    render_clip,
    render_demo_dataset,
    write_video,
)
from fsar.data.video import open_source

SMALL = DemoSpec(
    n_pairs=6, train_pairs=3, val_pairs=1, videos_per_class=2, n_frames=10, frames_jitter=2, size=48
)


def decode_all(path: Path) -> np.ndarray:
    source = open_source(path)
    return source.read(list(range(source.num_frames))).astype(np.float64)


def pair_with(motion: str):
    """The first default demo pair that moves with `motion`."""
    return next(pair for pair in demo_pairs(DemoSpec()) if pair.motion == motion)


def object_mask(clip: np.ndarray, pair) -> np.ndarray:
    """bool [T, H, W]: pixels far from the pair's background colour."""
    distance = np.abs(clip.astype(float) - np.array(pair.background)).sum(-1)
    return distance > 90


def test_write_video_refuses_odd_sizes_unknown_suffixes_and_non_uint8(tmp_path):
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="even.*32x33"):
        write_video(tmp_path / "a.mp4", np.zeros((3, 32, 33, 3), np.uint8))
    with pytest.raises(ValueError, match="'.mkv'; valid: .mp4, .avi, .webm"):
        write_video(tmp_path / "a.mkv", frames)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "a.mp4", frames.astype(np.float32))


def test_write_video_leaves_only_the_finished_file(tmp_path):
    write_video(tmp_path / "clip.webm", np.full((4, 32, 32, 3), 90, np.uint8), fps=8)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.webm"]
    assert open_source(tmp_path / "clip.webm").num_frames == 4


def test_reversed_twin_has_the_same_frame_mean_but_the_opposite_order(tmp_path):
    pair = pair_with("translate_x")
    spec = DemoSpec()
    forward = render_clip(pair, np.random.default_rng(7), spec)
    reverse = render_clip(pair, np.random.default_rng(7), spec, reverse=True)
    write_video(tmp_path / "forward.mp4", forward)
    write_video(tmp_path / "reverse.mp4", reverse)
    decoded_forward, decoded_reverse = (
        decode_all(tmp_path / "forward.mp4"),
        decode_all(tmp_path / "reverse.mp4"),
    )
    assert decoded_forward.shape == decoded_reverse.shape == forward.shape
    mean_gap = np.abs(decoded_forward.mean(0) - decoded_reverse.mean(0))  # [H, W, 3]
    assert mean_gap.mean() < 1.0 and mean_gap.max() < 12  # codec noise only
    # ...while the videos themselves differ: frame t of one is frame n-1-t of the other
    first_gap = np.abs(decoded_forward[0] - decoded_reverse[0]).mean()
    assert first_gap > 5 * mean_gap.mean()
    assert np.abs(decoded_forward[::-1] - decoded_reverse).mean() < 2.5


@pytest.mark.parametrize("motion", list(MOTIONS))
def test_every_motion_kind_changes_the_frames_over_time(motion):
    pair = pair_with(motion)
    clip = render_clip(pair, np.random.default_rng(1), DemoSpec())
    mask = object_mask(clip, pair)
    assert mask[-1].sum() > 10  # the object is visible at the end (also when fading in)
    assert np.abs(clip[0].astype(float) - clip[-1]).mean() > 2  # and it changed on the way


def test_forward_classes_move_the_way_their_names_say():
    rng = np.random.default_rng(3)
    spec = DemoSpec()

    def mask_of(motion):
        pair = pair_with(motion)
        return object_mask(render_clip(pair, rng, spec), pair)

    right = mask_of("translate_x")
    xs = [np.nonzero(frame)[1].mean() for frame in right]
    assert xs[-1] - xs[0] > 0.3 * spec.size  # moving_right: centroid goes right
    down = mask_of("translate_y")
    ys = [np.nonzero(frame)[0].mean() for frame in down]
    assert ys[-1] - ys[0] > 0.3 * spec.size  # moving_down: y grows downwards
    for growing in ("scale", "fill", "fade"):  # growing, filling, fading_in: more object pixels
        area = mask_of(growing).sum((1, 2))
        assert area[-1] > 1.5 * max(area[0], 1)


def test_per_video_randomness_differs_between_videos_and_repeats_with_the_seed():
    pair = pair_with("scale")
    spec = DemoSpec()
    first = render_clip(pair, np.random.default_rng([0, 2, 0, 0]), spec)
    again = render_clip(pair, np.random.default_rng([0, 2, 0, 0]), spec)
    other = render_clip(pair, np.random.default_rng([0, 2, 0, 1]), spec)
    assert np.array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)
    lengths = {len(render_clip(pair, np.random.default_rng(s), spec)) for s in range(40)}
    assert min(lengths) >= spec.n_frames - spec.frames_jitter and len(lengths) > 3
    assert max(lengths) <= spec.n_frames + spec.frames_jitter


def test_default_demo_has_five_way_val_and_test_splits_with_motions_seen_in_training():
    spec = DemoSpec()
    pairs = demo_pairs(spec)
    names = [name for pair in pairs for name in (pair.forward, pair.reverse)]
    assert len(set(names)) == 2 * spec.n_pairs
    assert all(" " not in name and "_" in name for name in names)
    train = pairs[: spec.train_pairs]
    held_out = pairs[spec.train_pairs :]
    assert 2 * spec.val_pairs >= 5 and 2 * (spec.n_pairs - spec.train_pairs - spec.val_pairs) >= 5
    assert {p.motion for p in held_out} <= {p.motion for p in train}
    assert len({(p.colour, p.shape) for p in pairs}) == spec.n_pairs


def test_demo_dataset_writes_decodable_videos_and_disjoint_split_lists(tmp_path):
    info = render_demo_dataset(tmp_path / "demo", SMALL)
    root = tmp_path / "demo"
    assert info.root == root and info.n_videos == 6 * 2 * 2
    assert (len(info.train_classes), len(info.val_classes), len(info.test_classes)) == (6, 2, 4)
    assert not set(info.train_classes) & set(info.val_classes + info.test_classes)
    assert not set(info.val_classes) & set(info.test_classes)
    listed = {}
    for split, classes in (
        ("train", info.train_classes),
        ("val", info.val_classes),
        ("test", info.test_classes),
    ):
        lines = (root / f"{split}list.txt").read_text().splitlines()
        assert len(lines) == len(classes) * SMALL.videos_per_class
        assert {line.split("/")[0] for line in lines} == set(classes)
        listed.update(dict.fromkeys(lines, split))
    assert len(listed) == info.n_videos
    for entry in listed:
        source = open_source(root / f"{entry}.mp4")
        low, high = SMALL.n_frames - SMALL.frames_jitter, SMALL.n_frames + SMALL.frames_jitter
        assert low <= source.num_frames <= high
        assert source.read([0]).shape == (1, SMALL.size, SMALL.size, 3)


def test_demo_dataset_is_byte_identical_from_the_same_seed(tmp_path):
    spec = DemoSpec(
        n_pairs=3,
        train_pairs=1,
        val_pairs=1,
        videos_per_class=1,
        n_frames=6,
        frames_jitter=1,
        size=32,
    )
    render_demo_dataset(tmp_path / "one", spec)
    render_demo_dataset(tmp_path / "two", spec)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.mp4"))
    assert len(files) == 6
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_an_existing_demo_is_reused_and_other_folders_are_refused(tmp_path):
    spec = DemoSpec(
        n_pairs=3,
        train_pairs=1,
        val_pairs=1,
        videos_per_class=1,
        n_frames=6,
        frames_jitter=1,
        size=32,
    )
    render_demo_dataset(tmp_path / "demo", spec)
    video = next((tmp_path / "demo").rglob("*.mp4"))
    written = video.stat().st_mtime_ns
    render_demo_dataset(tmp_path / "demo", spec)
    assert video.stat().st_mtime_ns == written
    with pytest.raises(ValueError, match="another spec"):
        render_demo_dataset(tmp_path / "demo", DemoSpec(**{**spec.__dict__, "seed": 1}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not a demo dataset.*thesis.tex"):
        render_demo_dataset(tmp_path / "mine", spec)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"n_pairs": 13}, "n_pairs=13"),
        ({"train_pairs": 9, "val_pairs": 3}, "leave no test pair"),
        ({"size": 95}, "size=95"),
        ({"suffix": ".mkv"}, "'.mkv'"),
    ],
)
def test_impossible_demo_specs_are_refused(change, problem):
    with pytest.raises(ValueError, match=problem):
        DemoSpec(**change)


@pytest.mark.slow
def test_the_default_demo_renders_well_under_thirty_seconds(tmp_path):
    start = time.perf_counter()
    info = render_demo_dataset(tmp_path / "demo")
    elapsed = time.perf_counter() - start
    assert info.n_videos == 240 and len(list((tmp_path / "demo").rglob("*.mp4"))) == 240
    assert elapsed < 30, f"rendering took {elapsed:.1f} s"
