"""End-to-end clips with the releases' rules: the frames a fine-tuning episode decodes follow the
release index rules, and CLIP-FSAR's augmentation flips and colour-jitters Kinetics-100 queries
only, with crops at 0..31 (golden/data_path/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsar.data.release_augment import clipfsar_train_clip, clipspm_train_clip
from fsar.data.release_frames import reachable_frames
from fsar.data.transforms import Preprocess
from fsar.pipelines.clips import TrainEpisodes, VideoSplit
from fsar.pipelines.episodes import EpisodeSampler, EpisodeShape

from .conftest import REPO

# the clipfsar_release preset's pixels: squash to 256x256, float bilinear, crop at 16
RELEASE = Preprocess(
    resize=256, crop=224, interpolation="bilinear_float", resize_mode="squash", crop_offset="floor"
)
LENGTHS = (40, 41, 57, 64)


def grey_of(frame_number: int) -> int:
    return 20 + 3 * frame_number  # flat frames survive H.264 within a grey level or two


@pytest.fixture(scope="module")
def numbered_videos(tmp_path_factory) -> VideoSplit:
    """Two classes x two mp4s whose frame t is a flat grey grey_of(t): decoded pixels name the
    source frame."""
    from fsar.data.synthetic import write_video

    root = tmp_path_factory.mktemp("numbered")
    paths = []
    for i, length in enumerate(LENGTHS):
        frames = np.zeros((length, 32, 32, 3), dtype=np.uint8)
        frames[:] = np.array([grey_of(t) for t in range(length)], dtype=np.uint8)[
            :, None, None, None
        ]
        path = root / f"v{i}.mp4"
        write_video(path, frames, fps=12)
        paths.append(str(path))
    return VideoSplit(
        split="train",
        video_ids=tuple(f"c{i // 2}/v{i}" for i in range(4)),
        paths=tuple(paths),
        class_ids=torch.tensor([0, 0, 1, 1]),
        class_names=("c0", "c1"),
        skipped=0,
    )


def frame_numbers(clip: torch.Tensor) -> list[int]:
    """Source frame of each frame of a clip (float [0, 1] or uint8 [T, 3, H, W])."""
    scale = 255.0 if clip.is_floating_point() else 1.0
    means = (clip.float() * scale).mean(dim=(1, 2, 3)).numpy()
    return [int(round((m - 20) / 3)) for m in means]


def test_finetune_clips_decode_the_release_frames(numbered_videos, shared):
    table = np.load(shared / "golden" / "data_path" / "clipfsar_test.npz")
    sampler = EpisodeSampler(numbered_videos, EpisodeShape(2, 1, 1))
    prep = Preprocess(resize=36, crop=32, normalize=True)
    segment = TrainEpisodes(numbered_videos, sampler, 7, 8, prep, False, rule="clipfsar_segment")
    seen = set()
    for task in range(12):
        item = segment[task]
        for part in ("support", "query"):
            rows = getattr(item.episode, part)[0].tolist()
            for row, clip in zip(rows, getattr(item, part), strict=True):
                got = np.array(frame_numbers(clip))
                length = LENGTHS[row]  # the golden ranges of row L - 1
                low = table["segment.fps12.seg_min"][length - 1]
                high = table["segment.fps12.seg_max"][length - 1]
                assert ((got >= low) & (got <= high)).all(), (row, got)
                seen.add((row, tuple(got)))
    assert len(seen) > 12  # redrawn at every occurrence
    again = segment[3]
    assert torch.equal(again.support, segment[3].support)  # seeded by (seed, task) alone
    k100 = TrainEpisodes(
        numbered_videos, sampler, 7, 8, prep, False, rule="clipfsar_k100_train", k100_queries=True
    )
    for task in range(6):
        item = k100[task]  # supports carry no colour jitter: their frames can be read back
        for row, clip in zip(item.episode.support[0].tolist(), item.support, strict=True):
            reachable = set(reachable_frames("clipfsar_k100_train", LENGTHS[row], 12.0).tolist())
            assert set(frame_numbers(clip)) <= reachable


def coordinate_frames(height: int = 256, width: int = 256) -> np.ndarray:
    """uint8 [2, H, W, 3]: red = column, green = row, blue = 0 (a 256 square is not resized)."""
    frames = np.zeros((2, height, width, 3), dtype=np.uint8)
    frames[..., 0] = np.arange(width, dtype=np.uint8)[None, None, :]
    frames[..., 1] = np.arange(height, dtype=np.uint8)[None, :, None]
    return frames


def test_clipfsar_supports_are_cropped_at_0_to_31_and_never_flipped():
    frames = coordinate_frames()
    offsets = set()
    for seed in range(400):
        clip = clipfsar_train_clip(frames, RELEASE, np.random.default_rng(seed), k100_query=False)
        assert clip.shape == (2, 3, 224, 224) and clip.dtype == torch.float32
        x, y = round(float(clip[0, 0, 0, 0]) * 255), round(float(clip[0, 1, 0, 0]) * 255)
        expected = torch.from_numpy(frames[:, y : y + 224, x : x + 224]).permute(0, 3, 1, 2)
        torch.testing.assert_close(
            clip * 255, expected.float(), atol=1e-3, rtol=0
        )  # no flip/jitter
        offsets.add((x, y))
    xs, ys = {x for x, _ in offsets}, {y for _, y in offsets}
    assert xs == set(range(32)) and ys == set(range(32))  # 32 is never drawn


def test_clipfsar_k100_queries_are_flipped_half_the_time_and_colour_jittered():
    grey_ramp = np.repeat(coordinate_frames()[:1, ..., :1], 3, axis=-1)  # R = G = B = column
    flips, jittered = 0, 0
    draws = 160
    for seed in range(draws):
        clip = clipfsar_train_clip(grey_ramp, RELEASE, np.random.default_rng(seed), k100_query=True)
        # brightness, contrast, saturation, hue and grayscale keep a grey ramp's order
        flips += bool(clip[0, 0, 0, 0] > clip[0, 0, 0, -1])
        plain = clipfsar_train_clip(grey_ramp, RELEASE, np.random.default_rng(seed), False)
        jittered += not torch.allclose(clip, plain, atol=1 / 255)
    assert 0.35 * draws < flips < 0.65 * draws
    assert jittered > 0.9 * draws


def test_clipspm_flips_before_it_crops():
    frames = coordinate_frames(256, 341)  # already short side 256: the resize keeps it
    prep = Preprocess(resize=256, crop=224, normalize=False)
    flipped = 0
    for seed in range(200):
        clip = clipspm_train_clip(frames, prep, np.random.default_rng(seed), flip=True)
        rng = np.random.default_rng(seed)
        mirrored = rng.random() < 0.5
        x1, y1 = int(rng.integers(0, 341 - 224 + 1)), int(rng.integers(0, 256 - 224 + 1))
        source = frames[:, :, ::-1] if mirrored else frames
        expected = torch.from_numpy(source[:, y1 : y1 + 224, x1 : x1 + 224].copy())
        assert torch.equal(clip, expected.permute(0, 3, 1, 2)), seed  # x1 in the mirrored frame
        flipped += mirrored
    assert 60 < flipped < 140
    ssv2 = clipspm_train_clip(frames, prep, np.random.default_rng(0), flip=False)
    rng = np.random.default_rng(0)  # no flip draw: x1 is the first number
    x1, y1 = int(rng.integers(0, 118)), int(rng.integers(0, 33))
    expected = torch.from_numpy(frames[:, y1 : y1 + 224, x1 : x1 + 224].copy())
    assert torch.equal(ssv2, expected.permute(0, 3, 1, 2))


def test_decoded_and_encoded_once_evaluation_draw_the_same_release_frames(tmp_path):
    """eval --decode (every episode decoded) and the cached path (every source frame encoded
    once, as a dense store) give the same scores under CLIP-FSAR's per-occurrence test rule."""
    from fsar.config import load_config
    from fsar.data.datasets import load_dataset
    from fsar.data.synthetic import DemoSpec, render_demo_dataset
    from fsar.pipelines.clips import video_split
    from fsar.pipelines.e2e_eval import evaluate_cached, evaluate_decoded
    from fsar.pipelines.episodes import fixed_episodes
    from fsar.pipelines.finetune import build_video_model, test_frame_options

    spec = DemoSpec(n_pairs=3, train_pairs=1, val_pairs=0, videos_per_class=3, n_frames=26, size=48)
    root = render_demo_dataset(tmp_path / "videos", spec).root
    config = load_config(
        [],
        [
            "head.name=otam",
            "dataset.name=demo",
            "protocol.test_frames=clipfsar_test",
            "extract.frames=dense:40",
            "eval.seed=4",
        ],
    )
    dataset = load_dataset("demo", root, splits=["test"])
    videos = video_split(dataset, "test")
    setup = build_video_model(config, dataset.class_names, torch.device("cpu"))
    episodes = fixed_episodes(videos, EpisodeShape(3, 1, 1), 12, seed=4)
    options = test_frame_options(config)
    assert options["dense"].spec == "dense:40"
    common = (setup.model, videos, episodes, setup.class_text, setup.policy, setup.prep)
    cached = evaluate_cached(*common, config.head, workers=0, bf16=False, **options)
    decoded = evaluate_decoded(*common, workers=0, bf16=False, **options)
    np.testing.assert_array_equal(cached.per_episode, decoded.per_episode)
    np.testing.assert_array_equal(cached.confusion, decoded.confusion)


@pytest.mark.slow
def test_finetune_with_the_clipfsar_preset_validates_like_eval_decode(tmp_path):
    """A short fine-tuning run with the CLIP-FSAR preset's frames and augmentation: its cached
    validation (every source frame encoded once) scores what ``eval --decode`` scores."""
    from fsar.config import load_config
    from fsar.data.synthetic import DemoSpec, render_demo_dataset
    from fsar.pipelines.finetune import finetune
    from fsar.pipelines.run_eval import run_evaluation

    spec = DemoSpec(n_pairs=4, train_pairs=2, val_pairs=0, videos_per_class=3, n_frames=20, size=48)
    root = render_demo_dataset(tmp_path / "videos", spec).root
    preset = REPO / "configs" / "presets" / "clipfsar_release.yaml"
    overrides = [
        "dataset.name=demo",
        f"dataset.root={root}",
        "model.name=fsar-tiny-vit",
        "head.name=clipfsar",
        "head.heads=2",
        "head.mlp_dim=32",
        "episodes.way=3",
        "protocol.train_query=1",
        "train.steps=2",
        "train.tasks_per_batch=2",
        "train.val_every=2",
        "train.val_episodes=12",
        "train.device=cpu",
        "finetune.workers=0",
        f"train.out={tmp_path / 'run'}",
    ]
    config = load_config([preset], overrides)
    assert (config.protocol.test_frames, config.protocol.train_frames) == (
        "clipfsar_test",
        "clipfsar_train",
    )
    result = finetune(config, progress=False)
    assert result.steps == 2 and len(result.history) == 1
    evaluation = load_config(
        [preset],
        overrides
        + [
            "eval.decode=true",
            "eval.split=test",
            "eval.episodes=12",
            f"eval.checkpoint={tmp_path / 'run' / 'last.pt'}",
            f"eval.out={tmp_path / 'decoded.json'}",
            "eval.device=cpu",
        ],
    )
    decoded, _ = run_evaluation(evaluation)
    assert decoded["accuracy"] == pytest.approx(result.history[0]["accuracy"])


class ScriptedDraws:
    """Stands in for the numpy generator with the golden's forced draws, and records the
    ranges asked for (the release's scripted `random` did the same)."""

    def __init__(self, flip_uniform: float, integers: list[int]):
        self.flip_uniform, self.values, self.asked = flip_uniform, list(integers), []

    def random(self) -> float:
        self.asked.append("random()")
        return self.flip_uniform

    def integers(self, low: int, high: int) -> int:
        self.asked.append((low, high - 1))  # inclusive, as randint
        return self.values.pop(0)


def test_clipspm_training_clip_matches_the_golden_forced_draws(shared):
    """The release's own training tensors for forced draws (start 1, end 22; flip then crop)."""
    from fsar.data.release_frames import clipspm_indices
    from fsar.data.transforms import to_model_input
    from fsar.data.video import open_source

    data = shared / "golden" / "data_path"
    golden = np.load(data / "clipspm_train.npz")
    source = open_source(data / "media" / "frames" / "landscape_320x240")
    prep = Preprocess(resize=256, crop=224, normalize=False, interpolation="bilinear")
    for case, flip_uniform, x1, y1 in (
        ("flip_x0_y32", 0.25, 0, 32),
        ("noflip_x117_y0", 0.75, 117, 0),
    ):
        indices = clipspm_indices(source.num_frames, 1, 22)
        assert indices.tolist() == golden[f"forced.{case}.indices"].tolist()
        draws = ScriptedDraws(flip_uniform, [x1, y1])
        clip = clipspm_train_clip(source.read(indices.tolist()), prep, draws, flip=True)
        assert draws.asked == ["random()", (0, 117), (0, 32)]  # the golden's draw order and ranges
        pixels = to_model_input(clip, normalize=False).numpy()
        difference = np.abs(pixels - golden[f"forced.{case}.pixels"]).max()
        assert difference <= 1 / 255 + 1e-6, (case, difference)


class ScriptedUniform:
    """Numpy-generator stand-in for CLIP-FSAR's crop draws: records uniform(a, b) ranges."""

    def __init__(self, values: list[float]):
        self.values, self.asked = list(values), []

    def uniform(self, low: float, high: float) -> float:
        self.asked.append((low, high))
        return self.values.pop(0)


def test_clipfsar_support_clip_at_the_centre_offset_is_the_golden_test_tensor(shared):
    """Squash (bilinear, no antialias) and a crop at 16, 16 are the release's test tensor."""
    from fsar.data.transforms import CLIP_MEAN, CLIP_STD

    golden = np.load(shared / "golden" / "data_path" / "clipfsar_test.npz")
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    for name in ("clip_320x240_30fps.mp4", "clip_170x128_12fps.mp4"):
        draws = ScriptedUniform([16.7, 16.2])  # int() -> 16, 16
        clip = clipfsar_train_clip(golden[f"video.{name}.decoded"], RELEASE, draws, False)
        assert draws.asked == [(0, 32), (0, 32)]
        pixels = ((clip - mean) / std).numpy()
        assert np.abs(pixels - golden[f"video.{name}.pixels"]).max() <= 1e-5, name
