"""Wall time of an 8-point ``fsar ablate`` grid with ``--jobs 2`` against ``--jobs 1`` (issue 14),
and whether a run's numbers depend on its CPU thread count.

Each measurement is the whole command as a user runs it (``python -m fsar ablate ...`` in a fresh
process: start-up, worker start-up, training, evaluation, table), the two modes alternating over
``--rounds`` in fresh output folders. Both modes must write the same table, byte for byte.

The thread check trains the grid's first point with 1 and with 2 torch threads and compares the
trained weights bit for bit (the reason ``ablate.threads`` is fixed per run, not per machine);
``--heads-only`` runs one training forward + backward of every registered head at 1 and 2
threads instead, at D=64 (tiny widths) and D=1024 (release widths).

    python benchmarks/ablate_jobs.py --out benchmarks/results/ablate_jobs.json [--store STORE]
    python benchmarks/ablate_jobs.py --heads-only --out benchmarks/results/threads_per_head.json

Without ``--store`` the demo dataset is rendered and extracted (fsar-tiny-vit) into ``--dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GRID = [
    "--grid",
    "train.lr=0.001,0.0003",
    "--grid",
    "head.dim_head=8,16",
    "--grid",
    "head.spm=generated,none",
]
FLAGS = ["--head", "clipspm", "--device", "cpu"]
SETTINGS = [
    "head.heads=2",
    "head.mlp_dim=64",
    "head.prompt_hidden=64",
    "train.tasks_per_batch=8",
    "train.episode_batch=8",
    "train.val_every=50",
    "train.val_episodes=100",
    "eval.episodes=500",
    "eval.episode_batch=100",
]


def make_store(folder: Path) -> Path:
    from fsar.config import load_config
    from fsar.data.synthetic import DemoSpec, render_demo_dataset
    from fsar.extract.runner import run_extraction

    render_demo_dataset(folder / "videos", DemoSpec())
    store = folder / "store.zarr"
    config = load_config(
        [],
        [
            "dataset.name=demo",
            f"dataset.root={folder / 'videos'}",
            "model.name=fsar-tiny-vit",
            f"extract.out={store}",
            "extract.workers=0",
        ],
    )
    run_extraction(config, progress=False)
    return store


def ablate(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, its worker processes included) of one
    ``fsar ablate`` command in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fsar", "ablate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"fsar ablate {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def head_pass(name: str, dim: int, threads: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and gradients of one training forward + backward of a registered head at
    ``threads`` torch threads (tiny widths at dim 64, the release widths otherwise)."""
    from fsar.config import load_config
    from fsar.heads import episode_loss
    from fsar.heads.registry import HEADS
    from fsar.pipelines.build import aux_weights, build_head

    torch.set_num_threads(threads)
    spec = HEADS[name]
    options = [f"head.name={name}"]
    if dim == 64:
        options += [f"head.{key}={value}" for key, value in spec.tiny.items()]
    config = load_config([], options)
    torch.manual_seed(0)
    head = build_head(config.head, dim, {}, 20)
    way, shot, query, frames, batch = 5, 1, 4, 8, 4
    g = torch.Generator().manual_seed(1)
    support = torch.randn(batch, way * shot, frames, dim, generator=g)
    query_x = torch.randn(batch, way * query, frames, dim, generator=g)
    text = torch.randn(batch, way, dim, generator=g)
    support_labels = torch.arange(way).repeat_interleave(shot).expand(batch, -1)
    query_labels = torch.arange(way).repeat_interleave(query).expand(batch, -1)
    extras = {}
    if spec.training_inputs(config.head).class_ids:
        extras = {
            "support_class_ids": support_labels.clone(),
            "query_class_ids": query_labels.clone(),
            "text_table": torch.randn(20, dim, generator=g),
        }
    head.train()
    torch.manual_seed(2)  # dropout
    out = head(support, support_labels, query_x, text, query_labels=query_labels, **extras)
    params = [p for p in head.parameters() if p.requires_grad]
    if params:
        episode_loss(out, query_labels, aux_weights(config.head, set(out.aux))).backward()
    grads = [p.grad.clone() for p in params if p.grad is not None]
    return out.logits.detach().clone(), grads


def per_head_threads() -> dict[str, dict]:
    """For every registered head: do 1 and 2 threads give bitwise the same pass?"""
    from fsar.heads.registry import HEADS

    found = {}
    for name in HEADS:
        for dim in (64, 1024):
            (logits1, grads1), (logits2, grads2) = head_pass(name, dim, 1), head_pass(name, dim, 2)
            diffs = [float((a - b).abs().max()) for a, b in zip(grads1, grads2, strict=True)]
            found[f"{name}/D={dim}"] = {
                "logits_equal": torch.equal(logits1, logits2),
                "grads_equal": all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True)),
                "max_abs_grad_difference": max(diffs, default=0.0),
            }
            print(name, dim, found[f"{name}/D={dim}"], flush=True)
    torch.set_num_threads(1)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON to write")
    parser.add_argument("--store", help="feature store (default: render + extract the demo)")
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per grid point")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--heads-only",
        action="store_true",
        help="only the per-head check: one forward + backward of every head at 1 and 2 threads",
    )
    options = parser.parse_args()
    if options.heads_only:
        report = {
            "benchmark": "ablate_jobs --heads-only",
            "threads_per_head": per_head_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        }
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(report, indent=2) + "\n")
        return
    work = Path(options.dir or tempfile.mkdtemp(prefix="fsar_ablate_jobs_"))
    store = Path(options.store) if options.store else make_store(work)
    flags = ["--store", str(store), *FLAGS, "--steps", str(options.steps)]
    common = [*flags, *GRID, *SETTINGS]
    load = {"start": os.getloadavg()}
    times: dict[str, list[float]] = {"1": [], "2": []}
    cpu: dict[str, list[float]] = {"1": [], "2": []}
    run_seconds: dict[str, list[float]] = {"1": [], "2": []}  # mean over the 8 runs
    tables: dict[str, set[bytes]] = {"1": set(), "2": set()}
    for round_ in range(options.rounds):
        for jobs in ("1", "2") if round_ % 2 == 0 else ("2", "1"):
            out = work / f"grid_jobs{jobs}_round{round_}"
            wall, used = ablate(["--out", str(out), "--jobs", jobs, *common])
            times[jobs].append(wall)
            cpu[jobs].append(used)
            runs = [json.loads(p.read_text())["seconds"] for p in out.glob("*/seed=6/job.json")]
            run_seconds[jobs].append(sum(runs) / len(runs))
            tables[jobs].add((out / "table.md").read_bytes() + (out / "table.csv").read_bytes())
            print(
                f"--jobs {jobs}, round {round_}: {wall:.1f} s wall, {used:.1f} s CPU, "
                f"{run_seconds[jobs][-1]:.1f} s per run, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    load["after_grids"] = os.getloadavg()
    threads = {}
    for count in (1, 2):
        out = work / f"threads{count}"
        first_point = ["--grid", "train.lr=0.001", "head.dim_head=8", "head.spm=generated"]
        ablate(["--out", str(out), "--threads", str(count), *flags, *first_point, *SETTINGS])
        run = out / "lr=0.001" / "seed=6"
        threads[count] = (
            torch.load(run / "best.pt", weights_only=True)["head"],
            json.loads((run / "job.json").read_text())["result"]["accuracy"],
        )
    (one, acc_one), (two, acc_two) = threads[1], threads[2]
    differing = [k for k in one if not torch.equal(one[k], two[k])]
    max_diff = max((float((one[k] - two[k]).abs().max()) for k in differing), default=0.0)
    load["end"] = os.getloadavg()
    best = {jobs: min(values) for jobs, values in times.items()}
    report = {
        "benchmark": "ablate_jobs",
        "command": (
            "python -m fsar ablate --out OUT --jobs {1,2} --store STORE "
            + " ".join(FLAGS + ["--steps", str(options.steps)] + GRID + SETTINGS)
        ),
        "grid_points": 8,
        "steps_per_point": options.steps,
        "seconds": times,
        "cpu_seconds": cpu,
        "cores_used": {j: [c / w for c, w in zip(cpu[j], times[j], strict=True)] for j in times},
        "mean_seconds_per_run": run_seconds,
        "best_seconds": best,
        "speedup_jobs2_over_jobs1": best["1"] / best["2"],
        "tables_identical": len(tables["1"] | tables["2"]) == 1,
        "threads_check": {
            "trained_weights_bitwise_equal_1_vs_2_threads": not differing,
            "tensors_differing": len(differing),
            "tensors": len(one),
            "max_abs_weight_difference": max_diff,
            "accuracy_1_thread": acc_one,
            "accuracy_2_threads": acc_two,
        },
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1_5_15min": {k: [round(x, 2) for x in v] for k, v in load.items()},
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("best_seconds", "speedup_jobs2_over_jobs1")}))


if __name__ == "__main__":
    main()
