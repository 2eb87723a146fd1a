"""Dense frame stores built by the real extraction path: release frame rules draw source frames
per episode occurrence and gather exactly the cached features of those frames; release presets
refuse a store that lacks them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fsar.cache import open_store
from fsar.cache.bank import load_bank
from fsar.config import load_config, with_overrides
from fsar.data.release_frames import (
    clipspm_indices,
    clipspm_pad,
    release_indices,
    segment_ranges,
)
from fsar.data.transforms import Preprocess, apply_view
from fsar.data.video import open_source
from fsar.extract.encoders import EncoderSpec, build_encoder
from fsar.heads.registry import head_config
from fsar.pipelines.build import build_head, episode_tensors
from fsar.pipelines.episodes import EpisodeShape, fixed_episodes
from fsar.pipelines.evaluate import EvalSetup, evaluate_episodes
from fsar.pipelines.frame_plan import (
    FramePolicyError,
    check_store_frames,
    occurrence_rng,
    store_frames,
)
from fsar.pipelines.run_eval import run_evaluation
from fsar.pipelines.train import jitter_used_videos, train_heads

from .conftest import REPO, moving_square, run_fsar

BASE_ARGS = ("--dataset", "folder", "--model", "fsar-tiny-vit", "--workers", "0")
PRESETS = REPO / "configs" / "presets"


CAP = 48


def length_of(c: int, v: int) -> int:
    return 20 + 7 * v + 2 * c  # 20..45 frames: segments of 2..5 frames; one clip over the cap


@pytest.fixture(scope="module")
def long_root(tmp_path_factory) -> Path:
    """3 classes x 4 mp4 videos of 20..45 frames (class 2 at 30 fps, the others at 12), one
    52-frame video beyond the cap, one 5-frame video; v0, v1 train, the rest test."""
    from fsar.data.synthetic import write_video

    root = tmp_path_factory.mktemp("long_videos")
    train, test = [], []
    for c, name in enumerate(("left", "right", "lift")):
        for v in range(4):
            frames = moving_square(length_of(c, v), 32, (200, 60 * c, 40), 1 - 2 * (c % 2), c + v)
            write_video(root / name / f"v{v}.mp4", frames, fps=30 if c == 2 else 12)
            (train if v < 2 else test).append(f"{name}/v{v}")
    write_video(root / "lift" / "long.mp4", moving_square(52, 32, (9, 9, 9), 1, 7), fps=12)
    write_video(root / "left" / "short.mp4", moving_square(5, 32, (9, 9, 9), 1, 8), fps=12)
    test += ["lift/long", "left/short"]
    (root / "trainlist.txt").write_text("\n".join(train) + "\n")
    (root / "testlist.txt").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture(scope="module")
def dense_store(long_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense") / "dense.zarr"
    frames = f"dense:{CAP}"
    run_fsar("extract", *BASE_ARGS, "--root", str(long_root), "--out", str(out), "--frames", frames)
    return out


@pytest.fixture(scope="module")
def reference_store(long_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "reference.zarr"
    run_fsar("extract", *BASE_ARGS, "--root", str(long_root), "--out", str(out))
    return out


def test_a_dense_store_holds_every_source_frame_with_its_length_and_fps(dense_store):
    store = open_store(dense_store)
    ids = list(store.video_ids)
    assert store.recipe["frames"] == f"dense:{CAP}" and store.layout.t_cap == CAP
    for c, name in enumerate(("left", "right", "lift")):
        for v in range(4):
            row, length = ids.index(f"{name}/v{v}"), length_of(c, v)
            assert store.status[row] == 1 and store.n_frames[row] == length
            assert store.frame_index[row].tolist() == list(range(length)) + [-1] * (CAP - length)
            assert store.source_length[row] == length
            assert store.fps[row] == pytest.approx(30.0 if c == 2 else 12.0)
    row = ids.index("lift/long")  # beyond the cap: CAP frames spread over the video, recorded
    assert store.source_length[row] == 52 and store.n_frames[row] == CAP
    assert store.frame_index[row].tolist() == [int(f) for f in np.linspace(0, 51, CAP)]
    row = ids.index("left/short")  # 5 frames: fewer than the 8 both releases need
    assert store.status[row] == 2 and store.source_length[row] == 5


def test_episodes_gather_the_features_of_the_source_frames_the_rule_drew(dense_store, long_root):
    store = open_store(dense_store)
    bank = load_bank(store, "test")
    episodes = fixed_episodes(bank, EpisodeShape(2, 1, 1), 6, seed=3)
    setup = EvalSetup(bank, episodes, 8, "clipfsar_test", 3, dataset="folder")
    assert setup.rule == "clipfsar_segment" and setup.positions() is None
    with pytest.warns(UserWarning, match="1 of 7 'test' videos are longer than the store's dense"):
        support, query = setup.episode_positions(0, episodes)
    long_row = bank.video_ids.index("lift/long")
    expected_sources = []
    for b in range(len(episodes)):
        rng = occurrence_rng(3, b)  # supports in order, then queries
        for rows, positions in ((episodes.support[b], support[b]), (episodes.query[b], query[b])):
            for row, pos in zip(rows.tolist(), positions, strict=True):
                length = int(bank.source_length[row])
                source = release_indices("clipfsar_segment", length, rng)
                cached = bank.frame_index[row][pos.numpy()]
                if row == long_row:  # uncached draws take the nearest cached frame
                    assert np.abs(cached - source).max() <= 1
                else:
                    assert cached.tolist() == source.tolist()
                    expected_sources.append((row, source))
    # slices of the list draw what the whole list draws (episode_batch does not matter)
    part = setup.episode_positions(2, episodes.slice(2, 5))
    assert torch.equal(part[0], support[2:5]) and torch.equal(part[1], query[2:5])
    # the gathered features are the encoder's output for exactly those source frames
    gathered = episode_tensors(
        bank, episodes, (support, query), None, head_config("clipspm"), False
    )
    encoder = build_encoder(EncoderSpec("fsar-tiny-vit"))
    prep = Preprocess(resize=round(64 * 256 / 224), crop=64, normalize=True)
    row, source = expected_sources[0]  # episode 0's first support
    video = open_source(long_root / (bank.video_ids[row] + ".mp4"))
    with torch.no_grad():
        direct = encoder.model.encode_image(apply_view(video.read(source.tolist()), "center", prep))
    first = gathered.support[0, 0].numpy()
    np.testing.assert_allclose(first, direct.numpy(), atol=2e-3, rtol=2e-3)
    # two heads, two batch sizes: the same episodes and frames, so the same per-episode scores
    head = build_head(head_config("otam"), bank.feature_dim, {})
    one = evaluate_episodes(head, setup, head_config("otam"), episode_batch=1)
    four = evaluate_episodes(head, setup, head_config("otam"), episode_batch=4)
    np.testing.assert_array_equal(one.per_episode, four.per_episode)
    other = EvalSetup(bank, episodes, 8, "clipfsar_test", 4, dataset="folder")
    assert not torch.equal(other.episode_positions(0, episodes)[0], support)  # seeded by eval.seed


def test_kinetics_resolves_to_the_fps_dependent_centred_clip(dense_store):
    bank = load_bank(open_store(dense_store), "test")
    episodes = fixed_episodes(bank, EpisodeShape(2, 1, 1), 4, seed=0)
    setup = EvalSetup(bank, episodes, 8, "clipfsar_test", 0, dataset="kinetics")
    table = setup.positions()  # deterministic: one table for the split
    assert setup.rule == "clipfsar_k100_test" and table is not None
    for row in range(len(bank)):
        if bank.video_ids[row] == "lift/long":
            continue
        length, fps = int(bank.source_length[row]), float(bank.fps[row])
        want = release_indices("clipfsar_k100_test", length, fps=fps)
        assert bank.frame_index[row][table[row].numpy()].tolist() == want.tolist()


def test_training_draws_the_release_rules_over_the_source_frames(dense_store):
    bank = load_bank(open_store(dense_store), "train")
    episodes = fixed_episodes(bank, EpisodeShape(3, 1, 1), 8, seed=1)
    for rule in ("clipfsar_segment", "clipspm_train"):
        positions, _ = jitter_used_videos(bank, episodes, 8, torch.Generator().manual_seed(5), rule)
        again, _ = jitter_used_videos(bank, episodes, 8, torch.Generator().manual_seed(5), rule)
        assert all(torch.equal(a, b) for a, b in zip(positions, again, strict=True))
        draws = {}  # video -> the frame tuples of its occurrences
        for part, drawn in zip((episodes.support, episodes.query), positions, strict=True):
            for row, pos in zip(part.flatten().tolist(), drawn.flatten(0, 1), strict=True):
                source = bank.frame_index[row][pos.numpy()]
                draws.setdefault(row, set()).add(tuple(source.tolist()))
                length = int(bank.source_length[row])
                if rule == "clipfsar_segment":
                    low, high = segment_ranges(length)
                    assert ((source >= low) & (source <= high)).all()
                else:
                    pad = clipspm_pad(length)
                    options = {
                        tuple(clipspm_indices(length, s, e).tolist())
                        for s in range(pad + 1)
                        for e in range(length - 1 - pad, length)
                    }
                    assert tuple(source.tolist()) in options
        # a video met in several episodes of the batch is redrawn at each occurrence
        assert any(len(frames) > 1 for frames in draws.values())


@pytest.mark.slow
def test_release_presets_refuse_a_store_without_dense_frames(reference_store, tmp_path):
    out = tmp_path / "fsar_run"
    result = run_fsar(
        "train",
        "--dataset",
        "folder",
        "--head",
        "otam",
        "--config",
        str(PRESETS / "clipfsar_release.yaml"),
        "--store",
        str(reference_store),
        "--out",
        str(out),
        check=False,
    )
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "--frames dense" in message[0], result.stderr
    assert "protocol.test_frames=clipfsar_test" in message[0]
    assert not out.exists()  # refused before any work
    config = load_config(
        [PRESETS / "clipspm_release.yaml"],
        [f"train.store={reference_store}", f"train.out={tmp_path / 'spm'}", "head.name=otam"],
    )
    with pytest.raises(FramePolicyError, match="protocol.train_frames=clipspm_train"):
        train_heads(config, progress=False)
    assert not (tmp_path / "spm").exists()
    # CLIP-SPM's test frames are the reference_test frames: evaluation on such a store is fine
    check_store_frames("protocol.test_frames", "clipspm_test", "reference_test:8", "hmdb51", "s")
    for other in ("reference_test:16", "uniform:32"):
        with pytest.raises(FramePolicyError, match="--frames dense"):
            check_store_frames("protocol.test_frames", "clipspm_test", other, "hmdb51", "s")
    with pytest.raises(FramePolicyError, match="dense"):
        check_store_frames("protocol.test_frames", "clipfsar_test", "uniform:32", "hmdb51", "s")
    assert store_frames(open_store(reference_store).recipe) == "reference_test:8"
    config = load_config(
        [],
        [
            f"eval.store={reference_store}",
            f"eval.out={tmp_path / 'eval.json'}",
            "head.name=otam",
            "protocol.test_frames=clipfsar_test",
        ],
    )
    with pytest.raises(FramePolicyError, match="--frames dense"):
        run_evaluation(config)


def test_training_on_release_frames_resumes_to_the_same_weights(dense_store, tmp_path, monkeypatch):
    import shutil

    from fsar.pipelines import run_checkpoints

    config = load_config(
        [PRESETS / "clipfsar_release.yaml"],
        [
            f"train.store={dense_store}",
            "dataset.name=folder",
            "head.name=clipfsar",
            "head.heads=2",
            "head.mlp_dim=32",
            "episodes.way=3",
            "protocol.train_query=1",
            "train.steps=4",
            "train.tasks_per_batch=4",
            "train.episode_batch=2",
            "train.val_every=2",
            "train.val_episodes=20",
            "train.device=cpu",
        ],
    )
    assert config.protocol.train_frames == "clipfsar_train"
    save = run_checkpoints.save_checkpoint
    out, kept = tmp_path / "run", tmp_path / "step2.pt"

    def keep_step_two(path: Path, payload) -> None:  # the state a run killed after step 2 left
        save(path, payload)
        if payload["step"] == 2 and path.name == "last.pt":
            shutil.copy(path, kept)

    monkeypatch.setattr(run_checkpoints, "save_checkpoint", keep_step_two)
    config = with_overrides(config, {"train.out": str(out)})
    whole = train_heads(config, progress=False)
    monkeypatch.setattr(run_checkpoints, "save_checkpoint", save)
    final = torch.load(out / "last.pt", weights_only=True)["head"]
    shutil.rmtree(out)
    out.mkdir()
    shutil.copy(kept, out / "last.pt")
    resumed = train_heads(config, progress=False)
    assert resumed.resumed_from == 2 and whole.steps == resumed.steps == 4
    again = torch.load(out / "last.pt", weights_only=True)["head"]
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert [h["accuracy"] for h in whole.history] == [h["accuracy"] for h in resumed.history]
