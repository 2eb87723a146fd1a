"""Pure planning of the feature store: layouts, chunk-aligned blocks and their ranks."""

from __future__ import annotations

import numpy as np
import pytest

from fsar.cache.layout import (
    BlockData,
    StoreLayout,
    array_specs,
    assign_blocks,
    block_arrays,
    blocks_needing_work,
    chunk_blocks,
    empty_block,
    is_chunk_aligned,
    layout_differences,
    merge_blocks,
)


def small_layout(**changes) -> StoreLayout:
    fields = dict(
        video_ids=("a/1", "a/2", "b/1", "b/2", "c/1"),
        class_ids=(0, 0, 1, 1, 2),
        splits=("train", "train", "val", "test", "test"),
        class_names=("push left", "push right", "lift"),
        t_cap=4,
        feature_dim=6,
        views=("center", "flip"),
        layer_dims={"block0": 3},
        n_prompts=2,
        chunk_videos=2,
    )
    fields.update(changes)
    return StoreLayout(**fields)


def test_chunk_blocks_cover_every_video_once_in_chunk_aligned_blocks_for_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(1000):
        n, c = int(rng.integers(0, 500)), int(rng.integers(1, 40))
        blocks = chunk_blocks(n, c)
        assert len(blocks) == -(-n // c)
        covered = np.concatenate([np.arange(s, e) for s, e in blocks]) if blocks else []
        assert np.array_equal(covered, np.arange(n))  # contiguous, ordered, no overlap
        for s, e in blocks:
            assert is_chunk_aligned(s, e, n, c)
            assert e - s == c or e == n


def test_chunk_blocks_rejects_a_chunk_size_below_one():
    with pytest.raises(ValueError, match="chunk_videos=0"):
        chunk_blocks(10, 0)


def test_assign_blocks_is_disjoint_covering_balanced_and_deterministic_for_random_sizes():
    rng = np.random.default_rng(1)
    for _ in range(1000):
        n, c, world = int(rng.integers(0, 400)), int(rng.integers(1, 20)), int(rng.integers(1, 9))
        blocks = chunk_blocks(n, c)
        if rng.random() < 0.5:  # a resumed run assigns only some blocks
            keep = rng.random(len(blocks)) < 0.6
            blocks = [b for b, k in zip(blocks, keep, strict=True) if k]
        per_rank = [assign_blocks(blocks, r, world) for r in range(world)]
        assert [b for part in per_rank for b in part] == blocks  # disjoint and covering, in order
        counts = [len(part) for part in per_rank]
        assert max(counts) - min(counts) <= 1
        videos = [sum(e - s for s, e in part) for part in per_rank]
        assert max(videos) - min(videos) <= c  # balanced within one block
        assert per_rank == [assign_blocks(blocks, r, world) for r in range(world)]


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0)])
def test_assign_blocks_rejects_a_rank_outside_the_world(rank, world):
    with pytest.raises(ValueError, match=f"rank={rank}, world_size={world}"):
        assign_blocks([(0, 4)], rank, world)


def test_is_chunk_aligned_agrees_with_a_brute_force_definition():
    for n in range(0, 13):
        for c in range(1, 6):
            boundaries = set(range(0, n + 1, c)) | {n}
            for s in range(-1, n + 2):
                for e in range(-1, n + 2):
                    expected = 0 <= s < e <= n and s in boundaries and e in boundaries
                    assert is_chunk_aligned(s, e, n, c) == expected, (s, e, n, c)


def test_merge_blocks_joins_adjacent_blocks_into_bounded_chunk_aligned_spans():
    rng = np.random.default_rng(3)
    for _ in range(500):
        n, c = int(rng.integers(1, 300)), int(rng.integers(1, 12))
        blocks = [b for b in chunk_blocks(n, c) if rng.random() < 0.7]
        limit = int(rng.integers(1, 60))
        spans = merge_blocks(blocks, limit)
        covered = [i for s, e in spans for i in range(s, e)]
        assert covered == [i for s, e in blocks for i in range(s, e)]  # same videos, in order
        for s, e in spans:
            assert is_chunk_aligned(s, e, n, c)
            assert e - s <= max(limit, c)  # never more than the limit, unless one block is
            inside = [b for b in blocks if s <= b[0] < e]
            assert inside[0][0] == s and inside[-1][1] == e  # made of whole given blocks
            assert all(a[1] == b[0] for a, b in zip(inside, inside[1:], strict=False))


def test_blocks_needing_work_selects_blocks_with_pending_videos_and_failed_ones_on_request():
    rng = np.random.default_rng(2)
    for _ in range(300):
        n, c = int(rng.integers(1, 100)), int(rng.integers(1, 10))
        status = rng.choice([0, 1, 1, 1, 2], size=n).astype(np.uint8)
        blocks = chunk_blocks(n, c)
        got = blocks_needing_work(blocks, status)
        assert got == [(s, e) for s, e in blocks if 0 in status[s:e]]
        retry = blocks_needing_work(blocks, status, retry_failed=True)
        assert retry == [(s, e) for s, e in blocks if set(status[s:e]) - {1}]


def test_array_specs_name_exactly_the_spec_table_with_whole_video_chunks():
    layout = small_layout()
    specs = {s.name: s for s in array_specs(layout)}
    assert set(specs) == {
        "videos/id", "videos/class_id", "videos/split", "videos/n_frames", "videos/frame_index",
        "videos/status", "videos/error", "videos/source_length", "videos/fps",
        "classes/name", "classes/text",
        "classes/text_per_prompt", "features/center", "features/flip",
        "layers/center/block0", "layers/flip/block0",
    }  # fmt: skip
    assert specs["features/flip"].shape == (5, 4, 6) and specs["features/flip"].dtype == "float16"
    assert specs["features/flip"].chunks == (2, 4, 6)  # whole videos, full T_cap and D
    assert specs["layers/center/block0"].shape == (5, 4, 3)
    assert specs["videos/frame_index"].fill == -1 and specs["videos/status"].dtype == "uint8"
    assert specs["classes/text_per_prompt"].shape == (3, 2, 6)
    assert specs["videos/id"].dtype == "str"


def test_chunks_never_exceed_the_number_of_videos():
    specs = array_specs(small_layout(chunk_videos=64))
    assert {s.chunks[0] for s in specs if s.name.startswith("features")} == {5}


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"video_ids": ("a/1", "a/1", "b/1", "b/2", "c/1")}, "'a/1' appears twice"),
        ({"class_ids": (0, 0, 1)}, "class_ids has 3 entries"),
        ({"class_ids": (0, 0, 1, 1, 3)}, "must lie in 0..2; got 3"),
        ({"splits": ("train", "train", "val", "test", "dev")}, "unknown split 'dev'"),
        ({"views": ("flip",)}, "contain 'center'"),
        ({"layer_dims": {"a/b": 3}}, "'a/b'"),
        ({"t_cap": 0}, "t_cap must be >= 1"),
        ({"video_ids": (), "class_ids": (), "splits": ()}, "at least one video"),
    ],
)
def test_store_layout_rejects_inconsistent_fields_naming_the_bad_value(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        small_layout(**changes)


def test_layout_differences_name_each_differing_field():
    old = small_layout()
    assert layout_differences(old, small_layout()) == []
    new = small_layout(video_ids=("a/1", "a/2", "b/1", "x/9", "c/1"), t_cap=8)
    lines = layout_differences(old, new)
    assert any("video_ids" in line and "index 3" in line and "'x/9'" in line for line in lines)
    assert any(line.startswith("t_cap: 4 (store) vs 8") for line in lines)
    assert len(lines) == 2


def test_empty_block_is_pending_with_zero_features_and_padding_indices():
    block = empty_block(small_layout(), 3)
    assert block.features["flip"].shape == (3, 4, 6) and not block.features["flip"].any()
    assert block.layers["center"]["block0"].shape == (3, 4, 3)
    assert (block.frame_index == -1).all() and not block.status.any() and block.errors == [""] * 3


def done_block(layout: StoreLayout, b: int) -> BlockData:
    block = empty_block(layout, b)
    block.status[:], block.n_frames[:] = 1, 2
    block.frame_index[:, :2] = [0, 5]
    return block


def test_block_arrays_casts_to_store_dtypes_and_puts_status_last():
    layout = small_layout()
    block = done_block(layout, 2)
    block.features = {v: np.ones((2, 4, 6), np.float32) for v in layout.views}
    arrays = block_arrays(layout, 2, block)
    assert arrays["features/center"].dtype == np.float16
    assert list(arrays)[-1] == "videos/status"


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b.features.pop("flip"), "features must hold the views"),
        (lambda b: b.layers["flip"].pop("block0"), r"layers\['flip'\] must hold"),
        (lambda b: setattr(b, "frame_index", b.frame_index[:, :3]), r"frame_index must have"),
        (lambda b: b.status.__setitem__(0, 7), "got \\[1, 7\\]"),
        (lambda b: b.n_frames.__setitem__(1, 0), "1 <= n_frames <= T_cap=4"),
        (lambda b: b.frame_index.__setitem__((0, 3), 9), "frame_index of a done video"),
        (lambda b: b.errors.pop(), "errors must hold 2 strings"),
    ],
)
def test_block_arrays_rejects_a_malformed_block_naming_the_problem(damage, message):
    layout = small_layout()
    block = done_block(layout, 2)
    damage(block)
    with pytest.raises(ValueError, match=message):
        block_arrays(layout, 2, block)
