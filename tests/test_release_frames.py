"""The releases' frame index rules against golden/data_path (normative), and their use on dense
stores: per-occurrence draws gathered from the cache, training draws, and the refusal of a store
that lacks the frames."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fsar.data.frames import (
    ReleaseFrameError,
    cached_positions,
    parse_frame_policy,
    reachable_frames,
    release_indices,
    select_frames,
)
from fsar.data.release_frames import k100_indices, k100_max_idx, segment_ranges
from fsar.data.video import open_source

FPS = {"12": 12.0, "30": 30.0, "25": 25.0, "29.97": 30000 / 1001}


def golden(shared: Path, name: str):
    path = shared / "golden" / "data_path" / name
    return np.load(path) if name.endswith(".npz") else json.loads(path.read_text())


def chi_square_critical(dof: int, tail: float = 1e-4) -> float:
    """x with P(chi-square(dof) > x) = tail: bisection on the regularised upper incomplete gamma
    function (torch.special.gammaincc), so no scipy is needed."""
    low, high = 0.0, 10.0 * dof + 100.0
    for _ in range(200):
        middle = (low + high) / 2
        survival = float(
            torch.special.gammaincc(
                torch.tensor(dof / 2, dtype=torch.float64),
                torch.tensor(middle / 2, dtype=torch.float64),
            )
        )
        low, high = (middle, high) if survival > tail else (low, middle)
    return (low + high) / 2


def chi_square(observed: dict, expected_probability: dict, draws: int) -> float:
    return sum(
        (observed.get(key, 0) - draws * p) ** 2 / (draws * p)
        for key, p in expected_probability.items()
    )


def test_chi_square_critical_value_matches_the_tabulated_quantiles():
    # tabulated chi-square quantiles: 0.95 at dof 1 = 3.841, 0.999 at dof 10 = 29.588,
    # 0.9999 at dof 1 = 15.137
    assert chi_square_critical(1, 0.05) == pytest.approx(3.841, abs=1e-3)
    assert chi_square_critical(10, 0.001) == pytest.approx(29.588, abs=1e-3)
    assert chi_square_critical(1) == pytest.approx(15.137, abs=1e-3)


# ----------------------------------------------------------------------------- CLIP-SPM
def test_clipspm_test_indices_equal_the_golden_table(shared):
    table = golden(shared, "clipspm_test.npz")
    ns, rows = table["test_index_table.T8.n"], table["test_index_table.T8.indices"]
    assert len(ns) == 393
    for n, row in zip(ns, rows, strict=True):
        assert release_indices("clipspm_test", int(n)).tolist() == row.tolist(), n
        # the store's reference_test policy caches exactly these frames
        assert select_frames(parse_frame_policy("reference_test"), int(n)) == row.tolist()


def test_clipspm_train_reaches_exactly_the_golden_tuples_with_the_golden_odds(shared):
    table = golden(shared, "clipspm_train.json")["frame_jitter"]["table"]
    assert [entry["n"] for entry in table] == list(range(8, 401))
    rng = np.random.default_rng(0)
    for entry in table:
        n = entry["n"]
        outcomes = {tuple(ix): count for ix, count in entry["outcomes"]}
        drawn = Counter(tuple(release_indices("clipspm_train", n, rng).tolist()) for _ in range(40))
        assert set(drawn) <= set(outcomes), n  # never outside the golden support
        union = np.unique(np.concatenate([np.array(ix) for ix in outcomes]))
        assert reachable_frames("clipspm_train", n).tolist() == union.tolist(), n
    for n in (9, 14, 20, 60, 400):  # the full support is reached, with the golden counts
        entry = table[n - 8]
        outcomes = {tuple(ix): count for ix, count in entry["outcomes"]}
        total = entry["n_draw_sequences"]
        draws = 20_000
        observed = Counter(
            tuple(release_indices("clipspm_train", n, rng).tolist()) for _ in range(draws)
        )
        assert set(observed) == set(outcomes), n
        if len(outcomes) > 1:
            probability = {key: count / total for key, count in outcomes.items()}
            statistic = chi_square(observed, probability, draws)
            assert statistic < chi_square_critical(len(outcomes) - 1), (n, statistic)
    assert len(table[60 - 8]["outcomes"]) == 36  # the 36 outcomes at 60 frames


# ----------------------------------------------------------------------------- CLIP-FSAR
def test_clipfsar_segments_equal_the_golden_ranges_and_short_videos_raise(shared):
    table = golden(shared, "clipfsar_test.npz")
    lengths = table["L"]
    for fps in FPS:
        low, high = table[f"segment.fps{fps}.seg_min"], table[f"segment.fps{fps}.seg_max"]
        raises = table[f"segment.fps{fps}.raises"]
        for length, lo, hi, fails in zip(lengths, low, high, raises, strict=True):
            length = int(length)
            if fails:
                with pytest.raises(ReleaseFrameError):
                    release_indices("clipfsar_segment", length, np.random.default_rng(0))
                continue
            assert segment_ranges(length)[0].tolist() == lo.tolist()
            assert segment_ranges(length)[1].tolist() == hi.tolist()
            drawn = release_indices("clipfsar_segment", length, np.random.default_rng(length))
            assert ((drawn >= lo) & (drawn <= hi)).all(), length
    assert table["segment.fps12.raises"][:7].all() and not table["segment.fps12.raises"][7:].any()


def test_clipfsar_segment_draws_cover_each_range_uniformly(shared):
    table = golden(shared, "clipfsar_test.npz")
    rng = np.random.default_rng(1)
    for length in (8, 23, 60, 177):
        lo = table["segment.fps12.seg_min"][length - 1]
        hi = table["segment.fps12.seg_max"][length - 1]
        draws = 6000
        samples = np.stack([release_indices("clipfsar_segment", length, rng) for _ in range(draws)])
        for i in range(8):
            values = Counter(samples[:, i].tolist())
            support = range(int(lo[i]), int(hi[i]) + 1)
            assert set(values) == set(support), (length, i)
            if len(support) > 1:
                uniform = {v: 1 / len(support) for v in support}
                statistic = chi_square(values, uniform, draws)
                assert statistic < chi_square_critical(len(support) - 1), (length, i, statistic)
        assert reachable_frames("clipfsar_segment", length).tolist() == list(
            range(int(lo[0]), int(hi[-1]) + 1)
        )


def test_clipfsar_k100_test_indices_equal_the_golden_tables_for_every_fps(shared):
    table = golden(shared, "clipfsar_test.npz")
    for key, fps in FPS.items():
        rows = table[f"k100.fps{key}.indices"]
        assert not table[f"k100.fps{key}.raises"].any()
        for length, row in zip(table["L"], rows, strict=True):
            got = release_indices("clipfsar_k100_test", int(length), fps=fps)
            assert got.tolist() == row.tolist(), (key, length)
            assert reachable_frames("clipfsar_k100_test", int(length), fps).tolist() == sorted(
                set(row.tolist())
            )
    with pytest.raises(ValueError, match="fps"):
        release_indices("clipfsar_k100_test", 40)


def test_clipfsar_k100_indices_of_the_golden_mp4s_from_their_decoded_length_and_fps(shared):
    table = golden(shared, "clipfsar_test.npz")
    for name in ("clip_320x240_30fps.mp4", "clip_170x128_12fps.mp4"):
        source = open_source(shared / "golden" / "data_path" / "media" / "videos" / name)
        assert source.num_frames == 40
        got = release_indices("clipfsar_k100_test", source.num_frames, fps=source.fps)
        assert (
            got.tolist() == table[f"video.{name}.k100_indices"].tolist() == [0, 1, 1, 2, 3, 4, 4, 5]
        )


def test_clipfsar_k100_training_clip_for_the_golden_starts(shared):
    configs = golden(shared, "clipfsar_train.json")["per_config"]
    checked = 0
    for name in ("kinetics100_1shot", "kinetics100_5shot"):
        for case in configs[name]["sampling"]["examples"]:
            length, fps = case["L"], case["fps"]
            top = k100_max_idx(length, fps)
            assert case["uniform_range"] == [0, top]
            starts = {
                "start_at_0": 0.0,
                "start_at_half (= test)": None,
                "start_just_below_max": float(np.nextafter(top, 0)),
            }
            for label, start in starts.items():
                assert k100_indices(length, fps, start).tolist() == case["examples"][label]
                checked += 1
            # a random start stays inside the clip's reachable set
            rng = np.random.default_rng(length)
            drawn = release_indices("clipfsar_k100_train", length, rng, fps=fps)
            assert set(drawn.tolist()) <= set(
                reachable_frames("clipfsar_k100_train", length, fps).tolist()
            )
    assert checked == 2 * 28 * 3  # 28 (L, fps) cases per config


def test_rules_are_pure_and_validate_their_arguments():
    a = release_indices("clipfsar_segment", 100, np.random.default_rng(3))
    b = release_indices("clipfsar_segment", 100, np.random.default_rng(3))
    assert a.dtype == np.int64 and a.tolist() == b.tolist()
    with pytest.raises(ValueError, match="rng"):
        release_indices("clipspm_train", 100)
    with pytest.raises(ValueError, match="unknown release frame rule"):
        release_indices("clipfsar", 100)


def test_cached_positions_map_source_frames_to_rows_and_flag_uncached_ones():
    index = np.array([0, 2, 4, 6, 8])
    rows, exact = cached_positions(index, np.array([0, 4, 8]))
    assert rows.tolist() == [0, 2, 4] and exact
    rows, exact = cached_positions(index, np.array([3, 5, 9]))
    assert rows.tolist() == [1, 2, 4] and not exact  # nearest, the earlier one on a tie


def test_dense_policy_caches_every_frame_up_to_its_cap():
    policy = parse_frame_policy("dense:16")
    assert (policy.kind, policy.t_cap, policy.min_frames) == ("dense", 16, 8)
    assert select_frames(policy, 12) == list(range(12))
    assert select_frames(policy, 40) == [int(v) for v in np.linspace(0, 39, 16)]
    assert parse_frame_policy("dense", t_cap=300).t_cap == 300
