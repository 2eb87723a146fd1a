"""Dense frame stores and the release-exact frame path on the demo data, side by side in one run.

1. Extraction: the demo videos extracted twice with the tiny model, ``reference_test`` (8 frames
   per video) and ``dense:CAP`` (every source frame): frames/s, videos/s, store bytes per video.
2. Accuracy: every demo head trained (the demo's settings and steps) and scored on the same
   fixed 5-way 1-shot test episodes, three ways:
   - ``fsar``: the reference_test store, fsar's rules (jitter over the 8 cached frames, the
     cached test frames) -- what the demo reports;
   - ``clipspm_release_frames``: the dense store, CLIP-SPM's own rules (training jitter over
     every source frame, its deterministic test frames);
   - ``clipfsar_release_frames``: the dense store, CLIP-FSAR's segment rule in training and at
     test (one random frame per segment, redrawn per episode occurrence);
   - ``clipspm_release`` / ``clipfsar_release``: the release's frame rules *and* its pixels (the
     resize, crop, normalisation and fp32 / float32 extraction of its preset), each on a dense
     store extracted with that preset's pixel rules: the whole release-exact path.
   Heads, widths, solver and episodes are the same throughout.

    python benchmarks/release_frames.py --out benchmarks/results/release_frames.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fsar.cache import open_store
from fsar.config import load_config, with_overrides
from fsar.data.synthetic import DemoSpec, render_demo_dataset
from fsar.extract.runner import run_extraction
from fsar.heads.registry import head_spec
from fsar.pipelines.demo import DEMO_HEADS, demo_config
from fsar.pipelines.evaluate import compare
from fsar.pipelines.run_eval import run_evaluation
from fsar.pipelines.train import train_heads

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "presets"
# the extract.* fields that make a preset's pixels (and their precision)
PIXEL_FIELDS = (
    "resize_mode", "interpolation", "crop_offset", "normalize", "mean", "std", "precision",
    "feature_dtype",
)  # fmt: skip
SPM_FRAMES = {"protocol.test_frames": "clipspm_test", "protocol.train_frames": "clipspm_train"}
FSAR_FRAMES = {"protocol.test_frames": "clipfsar_test", "protocol.train_frames": "clipfsar_train"}
PROTOCOLS = {
    "fsar": ("reference", {}),
    "clipspm_release_frames": ("dense", SPM_FRAMES),
    "clipfsar_release_frames": ("dense", FSAR_FRAMES),
    "clipspm_release": ("dense_clipspm_pixels", SPM_FRAMES),
    "clipfsar_release": ("dense_clipfsar_pixels", FSAR_FRAMES),
}


def preset_pixels(preset: str) -> dict:
    """extract.* overrides giving the pixels of configs/presets/<preset>.yaml."""
    extract = load_config([PRESETS / f"{preset}.yaml"], []).extract
    return {f"extract.{name}": getattr(extract, name) for name in PIXEL_FIELDS}


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def extract(config, frames: str, out: Path, pixels: dict | None = None) -> dict:
    config = with_overrides(
        config,
        {
            **(pixels or {}),
            "extract.frames": frames,
            "extract.out": str(out),
            "train.store": str(out),
        },
    )
    start = time.perf_counter()
    result = run_extraction(config, progress=False)
    seconds = time.perf_counter() - start
    store = open_store(out)
    done = int((store.status == 1).sum())
    layout = store.layout
    return {
        "frames": frames,
        "t_cap": layout.t_cap,
        "videos_done": done,
        "frames_encoded": result.frames_now,
        "seconds": round(seconds, 2),
        "frames_per_s": round(result.frames_now / seconds, 1),
        "videos_per_s": round(result.encoded_now / seconds, 2),
        "store_bytes_per_video": round(directory_bytes(out) / layout.n_videos),
        "feature_bytes_per_video_uncompressed": layout.t_cap * layout.feature_dim * 2,
        "mean_frames_per_video": round(float(store.n_frames[store.status == 1].mean()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/release_frames.json")
    parser.add_argument("--model", default="fsar-tiny-vit")
    parser.add_argument("--steps", type=int, default=150, help="training steps per head (demo)")
    parser.add_argument("--cap", type=int, default=32, help="dense:CAP (demo videos: 16-24)")
    parser.add_argument("--episodes", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        render_demo_dataset(work / "videos", DemoSpec())
        base = with_overrides(
            demo_config(work, args.model, args.steps),
            {"extract.workers": args.workers, "eval.episodes": args.episodes},
        )
        dense = f"dense:{args.cap}"
        recipes = {
            "reference": ("reference_test", None),
            "dense": (dense, None),
            "dense_clipspm_pixels": (dense, preset_pixels("clipspm_release")),
            "dense_clipfsar_pixels": (dense, preset_pixels("clipfsar_release")),
        }
        stores = {name: work / f"{name}.zarr" for name in recipes}
        extraction = {
            name: {**extract(base, frames, stores[name], pixels), "pixels": pixels or "fsar"}
            for name, (frames, pixels) in recipes.items()
        }
        accuracy, outcomes = {}, {}
        for name, (store, protocol) in PROTOCOLS.items():
            for head in DEMO_HEADS:
                config = with_overrides(
                    base,
                    {
                        **protocol,
                        "head.name": head,
                        "train.lr": head_spec(head).demo_lr,
                        "train.store": str(stores[store]),
                        "train.out": str(work / "runs" / name / head),
                        "eval.out": str(work / "results" / name / f"{head}.json"),
                    },
                )
                trained = train_heads(config, progress=False)
                result, outcome = run_evaluation(config, str(trained.out / "best.pt"))
                outcomes[name, head] = outcome
                entry = {
                    "accuracy": round(result["accuracy"], 2),
                    "ci95": round(result["ci95"], 2),
                    "episodes_sha256": result["episodes_sha256"],
                }
                if name != "fsar":  # paired with the fsar row on the same episodes
                    paired = compare(outcome, outcomes["fsar", head])
                    entry["paired_difference_vs_fsar"] = round(paired.difference, 2)
                    entry["paired_ci95"] = round(paired.ci95, 2)
                accuracy.setdefault(name, {})[head] = entry
                print(name, head, entry, flush=True)
    report = {
        "benchmark": "release_frames",
        "model": args.model,
        "demo": "DemoSpec() defaults: 24 classes x 10 mp4 videos, 96x96, 16-24 frames, 12 fps",
        "extraction": extraction,
        "dense_over_reference_store_bytes": round(
            extraction["dense"]["store_bytes_per_video"]
            / extraction["reference"]["store_bytes_per_video"],
            2,
        ),
        "accuracy_5way_1shot_test": accuracy,
        "steps_per_head": args.steps,
        "episodes": args.episodes,
        "seconds_total": round(time.perf_counter() - started, 1),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "machine": platform.platform(),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
