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

from fsar.cache import StoreLayout, create_store, open_store
from fsar.cache.bank import load_bank
from fsar.cache.integrity import (
    checked_status,
    require_finite,
    require_frame_counts,
    require_rows,
)


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
    arrays, step = store._arrays, chunk * 256  # many chunks per call: zarr writes them in parallel
    for start in range(0, n, step):
        b = min(step, n - start)
        arrays.write_many([
            ("features/center", start, rng.standard_normal((b, t, d)).astype(np.float16)),
            ("videos/n_frames", start, np.full(b, t, np.int32)),
            ("videos/frame_index", start, np.tile(np.arange(t, dtype=np.int32), (b, 1))),
            ("videos/error", start, np.array([""] * b, dtype=object)),
        ])  # fmt: skip
        arrays.write("videos/status", start, np.ones(b, np.uint8))
    per_prompt = rng.standard_normal((100, 1, d)).astype(np.float32)
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
