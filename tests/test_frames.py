"""Frame-index policies against hand-computed lists from the SPEC 3 formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsar.data.frames import (
    FramePolicy,
    ShortVideoError,
    linspace_trunc,
    parse_frame_policy,
    select_frames,
    train_frame_positions,
)
from fsar.data.synthetic import write_video
from fsar.data.video import DecodeError, open_source


@pytest.mark.parametrize(
    ("n_frames", "expected"),
    [
        # linspace(1, 18, 8) = 1, 3.43, 5.86, 8.29, 10.71, 13.14, 15.57, 18
        (20, [1, 3, 5, 8, 10, 13, 15, 18]),
        # n - 3 = 8 is not < 8: linspace(1, 9, 8) = 1, 2.14, 3.29, 4.43, 5.57, 6.71, 7.86, 9
        (11, [1, 2, 3, 4, 5, 6, 7, 9]),
        # n - 3 = 7 < 8: linspace(0, 9, 8) = 0, 1.29, 2.57, 3.86, 5.14, 6.43, 7.71, 9
        (10, [0, 1, 2, 3, 5, 6, 7, 9]),
        (8, [0, 1, 2, 3, 4, 5, 6, 7]),
    ],
)
def test_reference_test_policy_matches_the_release_formula(n_frames, expected):
    assert select_frames(parse_frame_policy("reference_test"), n_frames) == expected


def test_reference_test_repeats_frames_of_short_videos_when_allowed():
    policy = parse_frame_policy("reference_test", min_frames=1)
    # linspace(0, 2, 8) = 0, 0.29, 0.57, 0.86, 1.14, 1.43, 1.71, 2
    assert select_frames(policy, 3) == [0, 0, 0, 0, 1, 1, 1, 2]
    assert select_frames(policy, 1) == [0] * 8


@pytest.mark.parametrize(
    ("spec", "n_frames", "expected"),
    [
        ("uniform:4", 10, [0, 3, 6, 9]),
        ("uniform:5", 10, [0, 2, 4, 6, 9]),  # 0, 2.25, 4.5, 6.75, 9
        ("uniform:16", 10, list(range(10))),  # n <= K: every frame
        ("uniform:10", 10, list(range(10))),
        ("uniform:1", 7, [0]),
        ("all", 10, list(range(10))),
        ("all", 100, list(range(64))),  # capped at t_cap
        ("all:5", 9, [0, 1, 2, 3, 4]),
    ],
)
def test_uniform_and_all_policies_pick_the_spec_indices(spec, n_frames, expected):
    assert select_frames(parse_frame_policy(spec), n_frames) == expected


@pytest.mark.parametrize(
    ("spec", "kind", "t_cap", "min_frames"),
    [
        ("reference_test", "reference_test", 8, 8),
        ("reference_test:16", "reference_test", 16, 16),
        ("uniform:32", "uniform", 32, 1),
        ("all", "all", 64, 1),
        (" all:128 ", "all", 128, 1),
    ],
)
def test_policies_parse_with_their_slot_count_and_shortest_video(spec, kind, t_cap, min_frames):
    policy = parse_frame_policy(spec)
    assert (policy.kind, policy.t_cap, policy.min_frames) == (kind, t_cap, min_frames)
    assert parse_frame_policy(policy.spec) == policy


def test_seq_len_t_cap_and_min_frames_settings_are_honoured():
    assert parse_frame_policy("reference_test", seq_len=4).t_cap == 4
    assert parse_frame_policy("all", t_cap=300).t_cap == 300
    assert parse_frame_policy("reference_test", min_frames=2).min_frames == 2
    assert parse_frame_policy("uniform:8", min_frames=5).min_frames == 5


@pytest.mark.parametrize("spec", ["uniform", "uniform:0", "uniform:x", "random", "all:-3", ""])
def test_a_bad_policy_names_the_valid_forms(spec):
    with pytest.raises(ValueError, match="valid forms: 'reference_test'.*'uniform:K'"):
        parse_frame_policy(spec)


def test_a_policy_cannot_be_built_with_zero_frames():
    with pytest.raises(ValueError, match="count=0"):
        FramePolicy("uniform", 0, 1)


def test_a_video_shorter_than_the_policy_is_a_readable_decode_error():
    with pytest.raises(ShortVideoError) as caught:
        select_frames(parse_frame_policy("reference_test"), 5)
    assert isinstance(caught.value, DecodeError)
    message = str(caught.value)
    assert "5 frames" in message and "8" in message and "min_frames" in message
    with pytest.raises(ShortVideoError, match="0 frames"):
        select_frames(parse_frame_policy("all"), 0)


def test_a_real_short_video_fails_the_reference_policy_but_not_uniform(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, np.full((5, 32, 32, 3), 128, np.uint8))
    n = open_source(path).num_frames
    assert n == 5
    with pytest.raises(DecodeError, match="5 frames, fewer than the 8"):
        select_frames(parse_frame_policy("reference_test"), n)
    assert select_frames(parse_frame_policy("uniform:8"), n) == [0, 1, 2, 3, 4]


def test_batchedlinspace_truncates_exactly_like_numpy():
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 50, 2000)
    ends = starts + rng.integers(0, 300, 2000)
    for num in (1, 2, 7, 8, 16):
        got = linspace_trunc(torch.from_numpy(starts), torch.from_numpy(ends), num)
        want = np.stack(
            [np.linspace(s, e, num).astype(np.int64) for s, e in zip(starts, ends, strict=True)]
        )
        assert np.array_equal(got.numpy(), want)


def test_training_positions_stay_inside_each_video_and_never_decrease():
    n_valid = torch.tensor([1, 2, 7, 8, 9, 10, 12, 18, 20, 33, 64, 300])
    positions = train_frame_positions(n_valid, 8, torch.Generator().manual_seed(0))
    assert positions.shape == (12, 8) and positions.dtype == torch.long
    assert int(positions.min()) >= 0
    assert bool((positions < n_valid[:, None]).all())
    assert bool((positions[:, 1:] >= positions[:, :-1]).all())


def test_training_positions_follow_the_release_jitter():
    n_valid = torch.full((4000,), 30)  # pad = int(min(5, 11)) = 5
    positions = train_frame_positions(n_valid, 8, torch.Generator().manual_seed(1))
    starts, ends = positions[:, 0], positions[:, -1]
    assert set(starts.tolist()) == set(range(0, 6))
    assert set(ends.tolist()) == set(range(24, 30))
    for row in positions[:50].tolist():
        assert row == [int(f) for f in np.linspace(row[0], row[-1], 8)]


def test_training_positions_use_the_whole_video_when_the_jittered_span_is_too_short():
    # n=10, T=8: pad=1, start in {0,1}, end in {8,9}; (1, 8) spans 7 < 8 -> (0, 9) as in the release
    positions = train_frame_positions(torch.full((2000,), 10), 8, torch.Generator().manual_seed(2))
    spans = {(row[0], row[-1]) for row in positions.tolist()}
    assert spans == {(0, 8), (0, 9), (1, 9)}


def test_videos_shorter_than_seq_len_repeat_frames():
    positions = train_frame_positions(torch.tensor([3, 1]), 8, torch.Generator().manual_seed(0))
    assert positions.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2], [0] * 8]


def test_training_positions_are_reproducible_from_the_generator_seed():
    n_valid = torch.randint(8, 200, (256,), generator=torch.Generator().manual_seed(3))
    first = train_frame_positions(n_valid, 8, torch.Generator().manual_seed(7))
    again = train_frame_positions(n_valid, 8, torch.Generator().manual_seed(7))
    other = train_frame_positions(n_valid, 8, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_a_video_with_no_cached_frames_is_refused_by_the_training_sampler():
    with pytest.raises(ValueError, match=r"batch rows \[1\]"):
        train_frame_positions(torch.tensor([9, 0]), 8, torch.Generator().manual_seed(0))
