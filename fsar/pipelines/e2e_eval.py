"""Scoring a video model (encoder + head) on fixed episodes of decoded videos.

Two ways, same frames and crops (the test policy), same numbers up to float rounding:
- ``encode_split``: each video used by the episodes goes through the encoder once, into an
  in-memory ``FeatureBank`` (float16, like a store), then the head scores the episodes as on a
  store. A 10,000-episode evaluation then costs one pass over the split's videos.
- ``evaluate_decoded``: the releases' way, every episode decoded and encoded on its own.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fsar.cache.bank import FeatureBank
from fsar.config import HeadConfig
from fsar.data.frames import FramePolicy
from fsar.data.transforms import Preprocess
from fsar.pipelines.backbone import VideoModel
from fsar.pipelines.clips import EvalEpisodes, EvalVideos, VideoSplit, collate_episodes
from fsar.pipelines.episodes import EpisodeIndex
from fsar.pipelines.evaluate import EvalOutcome, EvalSetup, evaluate_episodes, tally


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on GPU when asked; CPU runs float32 (as train-heads)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


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
) -> FeatureBank:
    """Encode ``rows`` of ``videos`` (test policy) into a bank over all rows of the split.

    Rows not listed stay zero (no episode reads them). class_text float32 [C, D].
    """
    was_training = model.training
    model.eval()
    device = class_text.device
    rows = torch.unique(rows.cpu())
    dataset = torch.utils.data.Subset(EvalVideos(videos, policy, prep, backend), rows.tolist())
    seq_len = policy.count
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
    return FeatureBank(
        split=videos.split,
        video_ids=videos.video_ids,
        store_rows=np.arange(len(videos)),
        features={"center": features.to(device)},
        layers={},
        n_frames=torch.full((len(videos),), seq_len, dtype=torch.long, device=device),
        class_ids=videos.class_ids.to(device),
        class_text=class_text,
        class_names=videos.class_names,
        fingerprint="",
        skipped=videos.skipped,
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
) -> EvalOutcome:
    used = torch.cat([episodes.support.flatten(), episodes.query.flatten()])
    bank = encode_split(
        model,
        videos,
        used,
        class_text,
        policy,
        prep,
        workers=workers,
        bf16=bf16,
        backend=backend,
        progress=progress,
    )
    setup = EvalSetup(bank, episodes, policy.count, "cached", 0)
    return evaluate_episodes(model.head, setup, head_config, episode_batch)


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
) -> EvalOutcome:
    """Decode and encode every episode's videos, then score it (one episode per pass)."""
    was_training = model.training
    model.eval()
    device = class_text.device
    n_classes = len(class_text)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    accuracies = []
    loader = _loader(
        EvalEpisodes(videos, episodes, policy, prep, backend), 1, workers, collate_episodes
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
