"""Scoring a video model (encoder + head) on fixed episodes of decoded videos.

Two ways, same frames and crops (the test policy), same numbers up to float rounding:
- ``encode_split``: each video used by the episodes goes through the encoder once, into an
  in-memory ``FeatureBank`` (float16, like a store), then the head scores the episodes as on a
  store. A 10,000-episode evaluation then costs one pass over the split's videos. A release
  test rule that redraws frames per episode (``protocol.test_frames``) encodes every source
  frame instead (``encode_dense``, a dense store's bank) and draws as on a dense store.
- ``evaluate_decoded``: the releases' way, every episode decoded and encoded on its own.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fsar.cache.bank import FeatureBank
from fsar.config import HeadConfig
from fsar.data.frames import FramePolicy
from fsar.data.release_frames import RANDOM_RULES
from fsar.data.transforms import Preprocess
from fsar.devices import autocast_for
from fsar.pipelines.backbone import VideoModel
from fsar.pipelines.clips import (
    DenseVideos,
    EvalEpisodes,
    EvalVideos,
    VideoSplit,
    collate_episodes,
)
from fsar.pipelines.episodes import EpisodeIndex
from fsar.pipelines.evaluate import EvalOutcome, EvalSetup, evaluate_episodes, tally
from fsar.pipelines.frame_plan import resolve_rule


def _loader(dataset, batch_size: int, workers: int, collate=None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=2 if workers else None,
    )


@torch.no_grad()
def encode_split(
    model: VideoModel,
    videos: VideoSplit,
    rows: torch.Tensor,
    class_text: torch.Tensor,
    policy: FramePolicy,
    prep: Preprocess,
    *,
    workers: int,
    bf16: bool,
    batch_videos: int = 8,
    backend: str = "auto",
    progress: bool = False,
    rule: str | None = None,
) -> FeatureBank:
    """Encode ``rows`` of ``videos`` (test policy, or the deterministic release ``rule``) into a
    bank over all rows of the split.

    Rows not listed stay zero (no episode reads them). class_text float32 [C, D].
    """
    was_training = model.training
    model.eval()
    device = class_text.device
    rows = torch.unique(rows.cpu())
    clips = EvalVideos(videos, policy, prep, backend, rule)
    dataset = torch.utils.data.Subset(clips, rows.tolist())
    seq_len = policy.count if rule is None else 8
    features = None
    done = 0
    bar = tqdm(total=len(rows), unit="video", desc="encode", disable=not progress, leave=False)
    for pixels in _loader(dataset, batch_videos, workers):  # uint8 [b, T, 3, H, W]
        with autocast_for(device, bf16):
            encoded, _ = model.encode(pixels.to(device, non_blocking=True))
        if features is None:
            features = torch.zeros(len(videos), seq_len, encoded.shape[-1], dtype=torch.float16)
        features[rows[done : done + len(pixels)]] = encoded.half().cpu()
        done += len(pixels)
        bar.update(len(pixels))
    bar.close()
    model.train(was_training)
    n_frames = torch.full((len(videos),), seq_len, dtype=torch.long)
    return split_bank(videos, features, n_frames, class_text)


def split_bank(
    videos: VideoSplit,
    features: torch.Tensor,
    n_frames: torch.Tensor,
    class_text: torch.Tensor,
    **frames: object,
) -> FeatureBank:
    """A bank over every video of ``videos`` from features encoded here (no store): features
    float16 [V, T, D] and n_frames long [V] go to class_text's device; ``frames`` are a dense
    bank's frame_index / source_length / fps / frame_policy."""
    device = class_text.device
    return FeatureBank(
        split=videos.split,
        video_ids=videos.video_ids,
        store_rows=np.arange(len(videos)),
        features={"center": features.to(device)},
        layers={},
        n_frames=n_frames.to(device),
        class_ids=videos.class_ids.to(device),
        class_text=class_text,
        class_names=videos.class_names,
        fingerprint="",
        skipped=videos.skipped,
        **frames,
    )


def evaluate_cached(
    model: VideoModel,
    videos: VideoSplit,
    episodes: EpisodeIndex,
    class_text: torch.Tensor,
    policy: FramePolicy,
    prep: Preprocess,
    head_config: HeadConfig,
    *,
    workers: int,
    bf16: bool,
    episode_batch: int = 100,
    backend: str = "auto",
    progress: bool = False,
    test_frames: str = "cached",
    seed: int = 0,
    dataset: str | None = None,
    dense: FramePolicy | None = None,
) -> EvalOutcome:
    """Score on fixed episodes, each used video encoded once. test_frames / seed / dataset:
    the protocol's evaluation frames; a random release rule needs ``dense`` (the policy that
    caches every source frame)."""
    used = torch.cat([episodes.support.flatten(), episodes.query.flatten()])
    rule = resolve_rule(test_frames, dataset)
    kwargs = {"workers": workers, "bf16": bf16, "backend": backend, "progress": progress}
    if rule in RANDOM_RULES:
        if dense is None:
            raise ValueError(f"test frames {test_frames} draw per episode: pass a dense policy")
        bank = encode_dense(model, videos, used, class_text, dense, prep, **kwargs)
        setup = EvalSetup(bank, episodes, 8, test_frames, seed, dataset)
    else:
        bank = encode_split(model, videos, used, class_text, policy, prep, rule=rule, **kwargs)
        setup = EvalSetup(bank, episodes, int(bank.features["center"].shape[1]), "cached", 0)
    return evaluate_episodes(model.head, setup, head_config, episode_batch)


@torch.no_grad()
def encode_dense(
    model: VideoModel,
    videos: VideoSplit,
    rows: torch.Tensor,
    class_text: torch.Tensor,
    policy: FramePolicy,
    prep: Preprocess,
    *,
    workers: int,
    bf16: bool,
    backend: str = "auto",
    progress: bool = False,
) -> FeatureBank:
    """Encode every source frame (dense ``policy``) of ``rows``: the bank a dense store gives."""
    was_training = model.training
    model.eval()
    device = class_text.device
    rows = torch.unique(rows.cpu())
    dataset = torch.utils.data.Subset(DenseVideos(videos, policy, prep, backend), rows.tolist())
    cap, n = policy.count, len(videos)
    frame_index = np.full((n, cap), -1, dtype=np.int32)
    n_frames = np.ones(n, dtype=np.int64)
    length = np.zeros(n, dtype=np.int32)
    fps = np.zeros(n, dtype=np.float32)
    features = None
    bar = tqdm(total=len(rows), unit="video", desc="encode", disable=not progress, leave=False)
    for row, (pixels, index, source_length, source_fps) in zip(
        rows.tolist(), _loader(dataset, None, workers, None), strict=True
    ):
        with autocast_for(device, bf16):
            encoded, _ = model.encode(pixels.to(device, non_blocking=True))
        if features is None:
            features = torch.zeros(n, cap, encoded.shape[-1], dtype=torch.float16)
        count = len(index)
        features[row, :count] = encoded.half().cpu()
        frame_index[row, :count], n_frames[row] = index, count
        length[row], fps[row] = source_length, source_fps
        bar.update(1)
    bar.close()
    model.train(was_training)
    return split_bank(
        videos,
        features,
        torch.from_numpy(n_frames),
        class_text,
        frame_index=frame_index,
        source_length=length,
        fps=fps,
        frame_policy=policy.spec,
    )


@torch.no_grad()
def evaluate_decoded(
    model: VideoModel,
    videos: VideoSplit,
    episodes: EpisodeIndex,
    class_text: torch.Tensor,
    policy: FramePolicy,
    prep: Preprocess,
    *,
    workers: int,
    bf16: bool,
    backend: str = "auto",
    progress: bool = False,
    test_frames: str = "cached",
    seed: int = 0,
    dataset: str | None = None,
    dense: FramePolicy | None = None,
) -> EvalOutcome:
    """Decode and encode every episode's videos, then score it (one episode per pass).

    A release test rule (``test_frames``) picks each occurrence's frames as on a dense store
    (random rules seeded by (seed, episode index)); ``dense`` is unused here."""
    was_training = model.training
    model.eval()
    device = class_text.device
    n_classes = len(class_text)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    accuracies = []
    loader = _loader(
        EvalEpisodes(
            videos, episodes, policy, prep, backend, resolve_rule(test_frames, dataset), seed
        ),
        1,
        workers,
        collate_episodes,
    )
    for batch in tqdm(loader, total=len(episodes), unit="episode", disable=not progress):
        index = batch.episodes
        with autocast_for(device, bf16):
            output = model(
                batch.support.to(device),
                index.support_labels.to(device),
                batch.query.to(device),
                class_text[index.classes.to(device)],
            )
        accuracies.append(tally(output.logits.float(), index, confusion))
    model.train(was_training)
    return EvalOutcome(torch.cat(accuracies).numpy(), confusion.numpy())
