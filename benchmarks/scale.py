"""Scale (issue 14): an SSv2-Full-sized store through the whole frozen-feature path.

Two stores of the same 80,000 videos are written through the store API with random float16
features (D 512), SSv2-Full's classes (64 train / 12 val / 24 test) and its split sizes scaled
to 80,000 with their proportions, and random class text (16 prompts):

- ``reference_test``: T = 8 cached frames per video (fsar's default store);
- ``dense:48``: every source frame up to 48 (source lengths drawn like SSv2's, 12 fps; longer
  videos cache 48 frames spread over them, as extraction does), scored with the CLIP-SPM
  release frame rules (``protocol.test_frames=clipspm_test``, ``train_frames=clipspm_train``),
  so every episode draws source frames and gathers their cached rows.

Each phase runs in a child process (so its memory is its own): ``fsar cache info``, ``fsar
cache verify``, ``load_bank`` of the train split, ``fsar train`` (100 steps) and ``fsar eval``
(10,000 episodes). A child reports the seconds of the phase after its imports, its CPU seconds
and its peak resident set during the phase (VmHWM, reset after the imports) with the rise over
its resident set after imports.
Writes JSON.

    python benchmarks/scale.py --out benchmarks/results/scale.json [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from store_checks import fill_random, write_random_text

from fsar.cache import StoreLayout, create_store, open_store
from fsar.cache.bank import load_bank
from fsar.data.frames import parse_frame_policy

REPO = Path(__file__).resolve().parents[1]
# SSv2-Full (split ssv2_OTAM): split -> (classes, videos), shared/reference/paper_results.yaml
SSV2_FULL = {"train": (64, 77_500), "val": (12, 1_926), "test": (24, 2_854)}
SEQ_LEN, FPS = 8, 12.0
# training: CLIP-FSAR at small widths (the release's 8 x D/8 heads and 2048 MLP measure the head
# at ~2 s a step on this machine, which would hide the store and sampling costs looked at here)
TRAIN_HEAD = ["--head", "clipfsar", "head.heads=4", "head.dim_head=16", "head.mlp_dim=128"]
EVAL_HEAD = ["--head", "otam"]  # parameter-free: no checkpoint needed
RELEASE_FRAMES = ["protocol.test_frames=clipspm_test", "protocol.train_frames=clipspm_train"]


def split_sizes(total: int) -> dict[str, int]:
    """SSv2-Full's split sizes scaled to ``total`` videos (largest remainders)."""
    full = sum(videos for _, videos in SSV2_FULL.values())
    exact = {s: total * videos / full for s, (_, videos) in SSV2_FULL.items()}
    sizes = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: sizes[s] - exact[s])[: total - sum(sizes.values())]:
        sizes[s] += 1
    return sizes


def ssv2_layout(total: int, t_cap: int, dim: int) -> StoreLayout:
    """Videos in split order; each split's videos spread evenly over its own classes."""
    ids, class_ids, splits, names, first = [], [], [], [], 0
    for split, n in split_sizes(total).items():
        classes = SSV2_FULL[split][0]
        names += [f"{split} class {c}" for c in range(classes)]
        for i in range(n):
            class_ids.append(first + i % classes)
            ids.append(f"{split}/class{first + i % classes}/video{len(ids)}")
            splits.append(split)
        first += classes
    return StoreLayout(
        video_ids=tuple(ids),
        class_ids=tuple(class_ids),
        splits=tuple(splits),
        class_names=tuple(names),
        t_cap=t_cap,
        feature_dim=dim,
        n_prompts=16,
    )


def source_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Decoded frames per video, like SSv2's 12 fps clips of 2-6 s: mean 45, 30..70."""
    return np.clip(np.rint(rng.normal(45, 9, n)), 30, 70).astype(np.int32)


def build_store(path: Path, frames: str, total: int, dim: int, lengths: np.ndarray) -> dict:
    policy = parse_frame_policy(frames, seq_len=SEQ_LEN)
    recipe = {
        "benchmark": "scale",
        "dataset": "ssv2_full",
        "model": "random features",
        "frames": frames,
        "frame_policy": policy.kind,
        "seq_len": SEQ_LEN,
        "t_cap": policy.t_cap,
        "min_frames": policy.min_frames,
        "feature_dtype": "float16",
    }
    begin = time.perf_counter()
    store = create_store(path, ssv2_layout(total, policy.t_cap, dim), recipe)
    rng = np.random.default_rng(1)
    fill_random(store, rng, policy, lengths, np.full(total, FPS, np.float32), span_videos=1024)
    write_random_text(store, rng)
    seconds = time.perf_counter() - begin
    n_frames = store.n_frames
    files = [f for f in path.rglob("*") if f.is_file()]
    return {
        "frames": frames,
        "t_cap": policy.t_cap,
        "build_seconds": round(seconds, 1),
        "files": len(files),
        "size_gib": round(sum(f.stat().st_size for f in files) / 2**30, 3),
        "feature_gib_uncompressed": round(total * policy.t_cap * dim * 2 / 2**30, 3),
        "mean_cached_frames": round(float(n_frames.mean()), 2),
        "videos_over_cap": int((lengths > policy.t_cap).sum()) if policy.kind == "dense" else 0,
    }


# ------------------------------------------------------------------------------- child side
def memory_mib(field: str) -> float:
    """A field of /proc/self/status in MiB: VmRSS (now) or VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as file:
        line = next(line for line in file if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(result: Path, argv: list[str]) -> None:
    """Run one phase in this process and write its figures to ``result``.

    The peak is the kernel's high-water mark of this process's resident set, reset (via
    /proc/self/clear_refs) after the imports: ``ru_maxrss`` would also count the parent's pages
    at the fork before exec.
    """
    import fsar.commands  # noqa: F401 - what the CLI imports lazily belongs to the start-up
    from fsar.cli import main

    start_rss = memory_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset VmHWM to the current resident set
    usage = resource.getrusage(resource.RUSAGE_SELF)
    begin, extra, code = time.perf_counter(), {}, 0
    if argv[0] == "load_bank":  # load_bank STORE SPLIT
        bank = load_bank(open_store(Path(argv[1])), argv[2])
        tensors = [*bank.features.values(), bank.n_frames, bank.class_ids, bank.class_text]
        extra = {
            "videos": len(bank),
            "bank_mib": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1),
        }
    else:
        code = main(argv)
    seconds = time.perf_counter() - begin
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = end.ru_utime + end.ru_stime - usage.ru_utime - usage.ru_stime
    peak = memory_mib("VmHWM")
    figures = {
        "exit_code": code,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "rss_after_imports_mib": round(start_rss, 1),
        "peak_rss_mib": round(peak, 1),
        "peak_rss_rise_mib": round(peak - start_rss, 1),
        **extra,
    }
    result.write_text(json.dumps(figures) + "\n")


# ------------------------------------------------------------------------------ parent side
def phase(work: Path, name: str, argv: list[str]) -> dict:
    """Run ``argv`` (an fsar command line, or load_bank STORE SPLIT) in a child process."""
    result, log = work / f"{name}.json", work / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(result), "--", *argv]
    load_before = os.getloadavg()[0]
    begin = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.perf_counter() - begin
    if done.returncode != 0 or not result.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"phase {name} failed ({done.returncode}): {' '.join(argv)}\n{tail}")
    figures = json.loads(result.read_text())
    if figures["exit_code"] != 0:
        raise RuntimeError(f"phase {name}: fsar exited {figures['exit_code']}\n{log.read_text()}")
    figures.update(
        wall_seconds=round(wall, 2),
        load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )
    print(f"  {name}: {figures}", flush=True)
    return figures


def train_figures(run: Path, steps: int, tasks_per_batch: int) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    val = [line for line in lines if line["kind"] == "val"]
    rate = train[-1]["episodes_per_s"]  # over the whole loop, before the final validation
    return {
        "loop_episodes_per_s": round(rate, 2),
        "loop_seconds": round(steps * tasks_per_batch / rate, 1),
        "final_loss": round(train[-1]["loss"], 4),  # CE + CLIP-FSAR's text term: ln 5 + ln 64
        "val_accuracy": round(val[-1]["accuracy"], 2) if val else None,
    }


def measure(work: Path, label: str, store: Path, args, frames: list[str]) -> dict:
    out: dict = {}
    out["cache_info"] = phase(work, f"{label}_info", ["cache", "info", str(store)])
    out["cache_verify"] = phase(work, f"{label}_verify", ["cache", "verify", str(store)])
    out["load_bank_train"] = phase(work, f"{label}_load", ["load_bank", str(store), "train"])
    run = work / f"{label}_run"
    train = [
        "train", "--store", str(store), "--out", str(run), "--device", "cpu",
        "--steps", str(args.steps), *TRAIN_HEAD, f"train.val_every={args.steps}",
        f"train.val_episodes={args.val_episodes}", f"train.log_every={args.steps}", *frames,
    ]  # fmt: skip
    out["train"] = phase(work, f"{label}_train", train)
    out["train"].update(train_figures(run, args.steps, 16))
    # the rest: train + val bank loads, the final validation, checkpoints
    out["train"]["other_seconds"] = round(out["train"]["seconds"] - out["train"]["loop_seconds"], 1)
    result = work / f"{label}_scores.json"
    evaluate = [
        "eval", "--store", str(store), "--out", str(result), "--device", "cpu",
        "--episodes", str(args.episodes), *EVAL_HEAD, *frames,
    ]  # fmt: skip
    out["eval"] = phase(work, f"{label}_eval", evaluate)
    scored = json.loads(result.read_text())
    out["eval"].update(
        episodes=scored["episodes"],
        episodes_per_s=round(scored["episodes"] / out["eval"]["seconds"], 1),
        accuracy=round(scored["accuracy"], 2),
    )
    return out


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # a phase: --child RESULT -- ARGV...
        child(Path(sys.argv[2]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: tmp)")
    parser.add_argument("--videos", type=int, default=80_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dense-cap", type=int, default=48)
    parser.add_argument("--no-dense", action="store_true", help="the T = 8 store only")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--val-episodes", type=int, default=1000)
    parser.add_argument("--episodes", type=int, default=10_000)
    args = parser.parse_args()
    began = time.perf_counter()
    workdir = Path(args.workdir or tempfile.gettempdir())
    caps = [SEQ_LEN] + ([] if args.no_dense else [args.dense_cap])
    need = sum(args.videos * t * args.dim * 2 for t in caps) * 1.1 + 2**30
    free = shutil.disk_usage(workdir).free
    videos = args.videos if free >= need else int(args.videos * (free - 2**30) / need)
    if videos < args.videos:
        print(f"only {free / 2**30:.1f} GiB free: {videos} videos instead of {args.videos}")
    lengths = source_lengths(videos, np.random.default_rng(0))
    result: dict = {
        "videos": videos,
        "scaled_down_for_disk": videos < args.videos,
        "splits": split_sizes(videos),
        "feature_dim": args.dim,
        "source_length": {
            "mean": round(float(lengths.mean()), 1),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
            "fps": FPS,
        },  # fmt: skip
        "train_head": " ".join(TRAIN_HEAD),
        "train_steps": args.steps,
        "train_tasks_per_batch": 16,
        "val_episodes": args.val_episodes,
        "eval_head": " ".join(EVAL_HEAD),
        "stores": {},
    }
    with tempfile.TemporaryDirectory(dir=workdir, prefix="fsar_scale_") as tmp:
        work = Path(tmp)
        result["baseline"] = phase(work, "baseline", ["heads"])  # start-up: imports + a listing
        for t_cap in caps:
            label = "reference_test" if t_cap == SEQ_LEN else f"dense_{t_cap}"
            frames = "reference_test" if t_cap == SEQ_LEN else f"dense:{t_cap}"
            path = work / f"{label}.zarr"
            print(f"building {path} ({frames})", flush=True)
            built = build_store(path, frames, videos, args.dim, lengths)
            print(f"  {built}", flush=True)
            rules = [] if t_cap == SEQ_LEN else RELEASE_FRAMES
            built["frame_rules"] = " ".join(rules) or "cached"
            result["stores"][label] = {**built, **measure(work, label, path, args, rules)}
            shutil.rmtree(path)  # the next store needs the room
    result["total_seconds"] = round(time.perf_counter() - began, 1)
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "torch": torch.__version__,
        "threads": "OMP_NUM_THREADS=1 in every child",
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
