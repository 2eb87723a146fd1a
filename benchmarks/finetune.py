"""End-to-end fine-tuning throughput and peak memory: 5-way 1-shot and 5-shot, with and without
gradient checkpointing of the encoder.

Each measurement is one ``fsar.pipelines.finetune.finetune`` run in a fresh subprocess (so its
peak memory is its own) on the rendered demo dataset; the four settings alternate over
``--rounds`` rounds and the median rate is kept. The rate counts the steps after ``--warmup``
(worker start-up excluded) from the run's own metrics.jsonl. Peak memory: on GPU
``torch.cuda.max_memory_allocated``; on CPU the process's peak resident set (``ru_maxrss``) and
its rise during ``finetune`` (model build, workers' shared pages and activations). Writes JSON.

    python benchmarks/finetune.py [--out benchmarks/results/finetune.json] [--device auto]
        [--model fsar-tiny-vit] [--head clipfsar] [--set KEY=VALUE ...]
    GPU: --model ViT-B-16 --device cuda --set train.bf16=true   (random weights: timing only)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = [(shot, ckpt) for shot in (1, 5) for ckpt in (False, True)]


def child(args: argparse.Namespace) -> None:
    """One run; prints a JSON line with its rate and memory."""
    import torch

    from fsar.config import load_config
    from fsar.extract.encoders import TINY_MODELS
    from fsar.pipelines.finetune import finetune

    out = Path(args.workdir) / f"run_{args.shot}shot_{int(args.ckpt)}ckpt_{os.getpid()}"
    steps = args.warmup + args.steps
    overrides = [
        "dataset.name=demo",
        f"dataset.root={args.videos}",
        f"model.name={args.model}",
        f"model.random_init={str(args.model not in TINY_MODELS).lower()}",
        f"head.name={args.head}",
        f"episodes.shot={args.shot}",
        f"train.out={out}",
        f"train.steps={steps}",
        f"train.val_every={steps}",
        "train.val_episodes=5",
        "train.log_every=1",
        f"train.tasks_per_batch={args.tasks_per_batch}",
        f"train.device={args.device}",
        f"finetune.grad_checkpointing={str(args.ckpt).lower()}",
        f"finetune.workers={args.workers}",
        *args.set,
    ]
    config = load_config([], overrides)
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finetune(config, progress=False)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = {x["step"]: x for x in lines if x["kind"] == "train"}
    episodes = config.train.tasks_per_batch

    def elapsed(step: int) -> float:  # the metrics' rate is cumulative since the first batch
        return step * episodes / train[step]["episodes_per_s"]

    measured = (steps - args.warmup) * episodes / (elapsed(steps) - elapsed(args.warmup))
    result = {
        "shot": args.shot,
        "grad_checkpointing": args.ckpt,
        "episodes_per_s": measured,
        "peak_rss_mib": peak_kib / 1024,
        "rss_rise_during_finetune_mib": (peak_kib - before_kib) / 1024,
    }
    if "peak_memory_gb" in train[steps]:
        result["peak_gpu_gib"] = train[steps]["peak_memory_gb"]
        result["gpu"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(result))


def measure(args: argparse.Namespace, videos: Path, work: Path, shot: int, ckpt: bool) -> dict:
    command = [sys.executable, __file__, "--child", "--videos", str(videos)]
    command += ["--workdir", str(work), "--shot", str(shot)] + (["--ckpt"] if ckpt else [])
    for name in ("model", "head", "device", "steps", "warmup", "tasks_per_batch", "workers"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for item in args.set:
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark run failed:\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/finetune.json")
    parser.add_argument("--model", default="fsar-tiny-vit")
    parser.add_argument("--head", default="clipfsar")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the clock starts")
    parser.add_argument("--tasks-per-batch", dest="tasks_per_batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra KEY=VALUE override")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--videos", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--shot", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from fsar.data.synthetic import render_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        videos = render_demo_dataset(work / "videos").root
        runs: dict[tuple[int, bool], list[dict]] = {setting: [] for setting in SETTINGS}
        for _ in range(args.rounds):
            for shot, ckpt in SETTINGS:  # alternate so that load hits every setting alike
                runs[(shot, ckpt)].append(measure(args, videos, work, shot, ckpt))
    results = []
    for rounds in runs.values():
        summary = {key: rounds[-1][key] for key in rounds[-1] if key != "episodes_per_s"}
        rates = [r["episodes_per_s"] for r in rounds]
        summary["episodes_per_s"] = round(statistics.median(rates), 3)
        summary["episodes_per_s_rounds"] = [round(r, 3) for r in rates]
        for key in ("peak_rss_mib", "rss_rise_during_finetune_mib", "peak_gpu_gib"):
            if key in summary:
                summary[key] = round(max(r[key] for r in rounds), 1)
        results.append(summary)
    by = {(r["shot"], r["grad_checkpointing"]): r for r in results}
    memory_key = "peak_gpu_gib" if "peak_gpu_gib" in results[0] else "rss_rise_during_finetune_mib"
    report = {
        "benchmark": "finetune",
        "model": args.model,
        "head": args.head,
        "way": 5,
        "tasks_per_batch": args.tasks_per_batch,
        "measured_steps": args.steps,
        "rounds": args.rounds,
        "overrides": args.set,
        "results": results,
        "checkpointing_rate_ratio": {
            f"{shot}shot": round(
                by[(shot, True)]["episodes_per_s"] / by[(shot, False)]["episodes_per_s"], 3
            )
            for shot in (1, 5)
        },
        "checkpointing_memory_ratio": {
            f"{shot}shot": round(
                by[(shot, True)][memory_key] / max(by[(shot, False)][memory_key], 1e-9), 3
            )
            for shot in (1, 5)
        },
        "memory_measure": memory_key,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
