"""Cost of the checks a FeatureBank load runs (issue 12) next to the load itself, on a large store.

A store of 80,000 videos (the size of SSv2-Full's lists) is simulated with a small D, so its
files are many (one per chunk of 16 videos and array, as extraction writes them) while its bytes
stay small; the checks that depend on the file count (chunk existence) are then at their
relative worst. Measured on the ``train`` split (60% of the videos): the whole ``load_bank``, the
same reads without any check (``plain_read``), each check alone (``check_*``: what the checks
add; the status is read by both), plus ``fsar cache verify`` (reads everything). Writes JSON.

    python benchmarks/store_checks.py --out benchmarks/results/store_checks.json [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fsar.cache import FeatureStore, StoreLayout, create_store, open_store
from fsar.cache.bank import load_bank
from fsar.cache.integrity import (
    checked_status,
    require_finite,
    require_frame_counts,
    require_rows,
)
from fsar.data.frames import FramePolicy, select_frames


def build(path: Path, n: int, t: int, d: int, chunk: int) -> None:
    rng = np.random.default_rng(0)
    splits = np.where(rng.random(n) < 0.6, "train", np.where(rng.random(n) < 0.25, "val", "test"))
    layout = StoreLayout(
        video_ids=tuple(f"class{i % 100}/video{i}" for i in range(n)),
        class_ids=tuple(int(i % 100) for i in range(n)),
        splits=tuple(splits),
        class_names=tuple(f"class {c}" for c in range(100)),
        t_cap=t,
        feature_dim=d,
        chunk_videos=chunk,
    )
    store = create_store(path, layout, {"benchmark": "store_checks"})
    fill_random(store, rng, span_videos=chunk * 256)
    write_random_text(store, rng)


def fill_random(
    store: FeatureStore,
    rng: np.random.Generator,
    policy: FramePolicy | None = None,
    lengths: np.ndarray | None = None,
    fps: np.ndarray | None = None,
    span_videos: int = 4096,
) -> None:
    """Write every video of a fresh store as done, with random float16 features, through
    ``FeatureStore.write_block`` (chunks of ``chunk_videos``, as extraction writes them).

    ``span_videos`` (rounded to whole chunks) go in one call, so zarr writes their chunk files
    concurrently; the store's contents do not depend on it. policy, lengths (int [N]) and fps
    (float [N]): the cached frames of each video are the source frames ``policy`` selects from
    ``lengths[i]`` frames, as extraction selects them (``select_frames``), padding zero; without
    a policy every video fills T_cap and records T_cap source frames.
    """
    lay = store.layout
    n, t, d = lay.n_videos, lay.t_cap, lay.feature_dim
    span = max(1, span_videos // lay.chunk_videos) * lay.chunk_videos
    lengths = np.full(n, t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    fps = np.zeros(n, np.float32) if fps is None else np.asarray(fps, np.float32)
    for start in range(0, n, span):
        stop = min(start + span, n)
        b = stop - start
        index = np.tile(np.arange(t, dtype=np.int32), (b, 1))
        if policy is not None:
            index.fill(-1)
            for i, length in enumerate(lengths[start:stop]):
                picked = select_frames(policy, int(length))
                index[i, : len(picked)] = picked
        features = rng.standard_normal((b, t, d), dtype=np.float32).astype(np.float16)
        features[index < 0] = 0  # padding slots hold zeros, as in an extracted store
        store.write_block(
            start,
            stop,
            features={view: features for view in lay.views},
            layers={},
            frame_index=index,
            n_frames=(index >= 0).sum(1).astype(np.int32),
            status=np.ones(b, np.uint8),
            errors=[""] * b,
            source_length=lengths[start:stop],
            fps=fps[start:stop],
        )


def write_random_text(store: FeatureStore, rng: np.random.Generator) -> None:
    """Random class text: per prompt float32 [C, P, D], and their mean as the class text."""
    lay = store.layout
    shape = (lay.n_classes, lay.n_prompts, lay.feature_dim)
    per_prompt = rng.standard_normal(shape).astype(np.float32)
    store.write_classes(per_prompt.mean(1), per_prompt)


def timed(fn, repeat: int = 3) -> float:
    """Best of ``repeat`` wall-clock seconds (the page cache is warm after the first)."""
    best = float("inf")
    for _ in range(repeat):
        begin = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - begin)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/store_checks.json")
    parser.add_argument("--dir", default=None, help="where to build the store (default: tmp)")
    parser.add_argument("--videos", type=int, default=80_000)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    t, chunk = 8, 16
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "store.zarr"
        begin = time.perf_counter()
        build(path, args.videos, t, args.dim, chunk)
        build_seconds = time.perf_counter() - begin
        store = open_store(path)
        rows = store.split_indices("train")
        names = ["videos/n_frames", "features/center"]

        def plain_load() -> tuple:  # what loading reads (the status too), without any check
            done = np.flatnonzero((store.splits == "train") & (store.status == 1))
            features = torch.from_numpy(store.read_features("center", done))
            return features, store.n_frames[done], store.class_ids[done], store.class_text

        features = torch.from_numpy(store.read_features("center", rows))
        n_frames = store.n_frames[rows]
        figures = {
            "load_bank_seconds": timed(lambda: load_bank(store, "train")),
            "plain_read_seconds": timed(plain_load),
            "check_status_chunks_exist_seconds": timed(
                lambda: store._arrays.missing_chunks("videos/status")
            ),
            "check_chunks_exist_seconds": timed(lambda: require_rows(store, names, rows, "x")),
            "check_finite_seconds": timed(
                lambda: require_finite(store, "features/center", features, rows, "x")
            ),
            "check_frame_counts_seconds": timed(
                lambda: require_frame_counts(store, n_frames, rows, "x")
            ),
            "verify_seconds": timed(store.verify, repeat=1),
        }
        checks = sum(v for k, v in figures.items() if k.startswith("check_"))
        figures["checked_status_read_seconds"] = timed(lambda: checked_status(store))
        result = {
            "videos": args.videos,
            "train_videos": int(rows.size),
            "t_cap": t,
            "feature_dim": args.dim,
            "chunk_videos": chunk,
            "files": sum(1 for p in path.rglob("*") if p.is_file()),
            "build_seconds": round(build_seconds, 2),
            **{k: round(v, 4) for k, v in figures.items()},
            "checks_seconds": round(checks, 4),
            "checks_share_of_plain_read": round(checks / figures["plain_read_seconds"], 3),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "store_dir": args.dir or tempfile.gettempdir(),
            },
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
