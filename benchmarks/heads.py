"""Benchmark of the few-shot heads; writes one JSON file.

Measures, in one run:
1. OTAM (bidirectional) forward+backward of fsar against a straightforward double loop over the
   DP cells (written below, vectorised over pairs only, as the releases do), on
   dists [B=16, Q=20, N=5, T=8, T=8];
2. CLIP-SPM training steps (forward with query labels, loss, backward, Adam step) in episodes/s at
   B=1 and B=16, dim 1024 and the release sizes, 5-way 1-shot with 4 queries per class, T=8;
3. on CPU, the CLIP-SPM training step of the pipeline benchmark (64-d features, widths 2x the
   features, B=16) with fsar's CPU kernels (dropout masks, OTAM log-add-exp) against
   the same step with the library kernels they replace, alternating, and each kernel alone.

Usage: python benchmarks/heads.py [--out benchmarks/results/heads.json] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsar.heads import CLIPSPMHead, blocks, episode_loss, otam, otam_bidirectional  # noqa: E402


def loop_otam_one_way(dists: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Straightforward OTAM: a Python double loop over the DP cells (vectorised over pairs)."""
    dists = F.pad(dists, (1, 1))
    cum = torch.zeros_like(dists)
    rows, width = dists.shape[-2], dists.shape[-1]
    for m in range(1, width):
        cum[..., 0, m] = dists[..., 0, m] + cum[..., 0, m - 1]
    for l in range(1, rows):
        cum[..., l, 1] = dists[..., l, 1] - lam * torch.log(
            torch.exp(-cum[..., l - 1, 0] / lam)
            + torch.exp(-cum[..., l - 1, 1] / lam)
            + torch.exp(-cum[..., l, 0] / lam)
        )
        for m in range(2, width - 1):
            cum[..., l, m] = dists[..., l, m] - lam * torch.log(
                torch.exp(-cum[..., l - 1, m - 1] / lam) + torch.exp(-cum[..., l, m - 1] / lam)
            )
        cum[..., l, -1] = dists[..., l, -1] - lam * torch.log(
            torch.exp(-cum[..., l - 1, -2] / lam)
            + torch.exp(-cum[..., l - 1, -1] / lam)
            + torch.exp(-cum[..., l, -2] / lam)
        )
    return cum[..., -1, -1]


def loop_otam_bidirectional(dists: torch.Tensor) -> torch.Tensor:
    return loop_otam_one_way(dists) + loop_otam_one_way(dists.transpose(-1, -2))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, repeats: int, device: torch.device, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "repeats": repeats}


def bench_otam(device: torch.device, repeats: int) -> dict:
    shape = (16, 20, 5, 8, 8)
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(shape, generator=g) * 2).to(device)

    def step(fn):
        def run():
            d = base.clone().requires_grad_()
            fn(d).sum().backward()

        return run

    # both compute the same numbers
    d1, d2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    a, b = otam_bidirectional(d1), loop_otam_bidirectional(d2)
    a.sum().backward()
    b.sum().backward()
    max_diff = max((a - b).abs().max().item(), (d1.grad - d2.grad).abs().max().item())

    # interleaved rounds, so that load from other processes hits both alike
    fsar, loop = [], []
    for _ in range(repeats):
        fsar.append(time_call(step(otam_bidirectional), 3, device, warmup=1)["median_s"])
        loop.append(time_call(step(loop_otam_bidirectional), 1, device, warmup=0)["median_s"])
    fsar.sort()
    loop.sort()
    return {
        "dists_shape": list(shape),
        "fsar_fwd_bwd": {"median_s": fsar[len(fsar) // 2], "min_s": fsar[0], "rounds": repeats},
        "double_loop_fwd_bwd": {
            "median_s": loop[len(loop) // 2],
            "min_s": loop[0],
            "rounds": repeats,
        },
        "speedup": loop[len(loop) // 2] / fsar[len(fsar) // 2],
        "speedup_of_best_times": loop[0] / fsar[0],
        "max_abs_diff_value_and_grad": max_diff,
    }


def bench_clipspm(device: torch.device, batch_sizes: list[int], dim: int, budget_s: float) -> dict:
    way, shot, query_per_class, frames = 5, 1, 4, 8
    torch.manual_seed(0)
    head = CLIPSPMHead(dim).to(device).train()  # release sizes: heads 8, dim_head 256, mlp 2048
    # the release's Adam (betas 0.5, 0.999); the fused kernel keeps the optimizer step from
    # dominating small batches
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-5, betas=(0.5, 0.999), fused=True)
    results = {}
    for b in batch_sizes:
        g = torch.Generator().manual_seed(b)
        s, q = way * shot, way * query_per_class
        support = torch.randn(b, s, frames, dim, generator=g).to(device)
        query = torch.randn(b, q, frames, dim, generator=g).to(device)
        class_text = torch.randn(b, way, dim, generator=g).to(device)
        support_labels = torch.arange(way).repeat_interleave(shot).repeat(b, 1).to(device)
        query_labels = torch.arange(way).repeat_interleave(query_per_class).repeat(b, 1).to(device)

        def train_step(episode=(support, support_labels, query, class_text), labels=query_labels):
            optimizer.zero_grad(set_to_none=True)
            out = head(*episode, query_labels=labels)
            episode_loss(out, labels, {"motion_consistency": 0.001}).backward()
            optimizer.step()

        start = time.perf_counter()
        train_step()  # warm-up, also sizes the repetitions to the time budget
        _sync(device)
        first = time.perf_counter() - start
        repeats = int(max(2, min(20, budget_s / max(first, 1e-6))))
        timing = time_call(train_step, repeats, device, warmup=0)
        results[f"B={b}"] = {**timing, "episodes_per_s": b / timing["median_s"]}
    return {
        "setting": {
            **dict(dim=dim, way=way, shot=shot, query_per_class=query_per_class, T=frames),
            **dict(heads=8, dim_head=256, mlp_dim=2048, prompt_hidden=2048),
            "step": "forward(train, query_labels) + CE + 0.001*motion_consistency; backward; "
            "Adam(fused)",
        },
        "results": results,
    }


@contextmanager
def library_kernels():
    """Swap fsar's CPU kernels for the library calls they replace (same maths)."""
    saved = blocks.Dropout.forward, otam._logaddexp
    blocks.Dropout.forward = torch.nn.Dropout.forward
    otam._logaddexp = torch.logaddexp
    try:
        yield
    finally:
        blocks.Dropout.forward, otam._logaddexp = saved


def bench_cpu_kernels(rounds: int) -> dict:
    """fsar's CPU kernels against the library ones, in the pipeline benchmark's CLIP-SPM step."""
    dim, b, way, query_per_class, frames = 64, 16, 5, 4, 8
    widths = dict(heads=8, dim_head=16, mlp_dim=128, prompt_hidden=128)
    torch.manual_seed(0)
    head = CLIPSPMHead(dim, **widths).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-5, betas=(0.5, 0.999))
    support = torch.randn(b, way, frames, dim)
    query = torch.randn(b, way * query_per_class, frames, dim)
    class_text = torch.randn(b, way, dim)
    support_labels = torch.arange(way).repeat(b, 1)
    query_labels = torch.arange(way).repeat_interleave(query_per_class).repeat(b, 1)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        out = head(support, support_labels, query, class_text, query_labels=query_labels)
        episode_loss(out, query_labels, {"motion_consistency": 0.001 * b}).backward()
        optimizer.step()

    def fwd_bwd(fn, *shapes):
        inputs = [torch.randn(shape, requires_grad=True) for shape in shapes]
        grad = torch.randn(shapes[0])  # a dense gradient, as in training (not sum()'s ones)

        def run():
            fn(*inputs).backward(grad)

        return run

    def forward_only(fn, *shapes):  # the log-add-exp runs inside the sweep operator
        inputs = [torch.randn(shape) for shape in shapes]

        def run():
            fn(*inputs)

        return run

    ours = {
        "train_step": train_step,
        "dropout_3600x128": fwd_bwd(blocks.Dropout(0.05).train(), (3600, 128)),
        "logaddexp_8x3200": forward_only(otam._logaddexp, (8, 3200), (8, 3200)),
    }
    library = {
        "train_step": train_step,
        "dropout_3600x128": fwd_bwd(lambda x: F.dropout(x, 0.05, True), (3600, 128)),
        "logaddexp_8x3200": forward_only(torch.logaddexp, (8, 3200), (8, 3200)),
    }
    times = {name: {"fsar": [], "library": []} for name in ours}
    for _ in range(rounds):  # alternate, so that load from other processes hits both alike
        for name in ours:
            times[name]["fsar"].append(time_call(ours[name], 3, torch.device("cpu"))["min_s"])
            with library_kernels():
                timing = time_call(library[name], 3, torch.device("cpu"))
            times[name]["library"].append(timing["min_s"])
    report = {
        "setting": {
            **dict(dim=dim, B=b, way=way, shot=1, query_per_class=query_per_class, T=frames),
            **widths,
            "timing": "best of 3 calls per round, median over rounds; train_step per episode; "
            "dropout forward + backward, log-add-exp forward (no autograd)",
        }
    }
    for name, pair in times.items():
        fsar_s, library_s = sorted(pair["fsar"]), sorted(pair["library"])
        per = b if name == "train_step" else 1
        report[name] = {
            "fsar_ms": round(1000 * fsar_s[len(fsar_s) // 2] / per, 3),
            "library_ms": round(1000 * library_s[len(library_s) // 2] / per, 3),
        }
        report[name]["speedup"] = round(report[name]["library_ms"] / report[name]["fsar_ms"], 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/heads.json", help="JSON output path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--otam-rounds", type=int, default=10)
    parser.add_argument("--kernel-rounds", type=int, default=7, help="CPU kernel comparison")
    parser.add_argument(
        "--step-budget-s",
        type=float,
        default=25.0,
        help="rough time per CLIP-SPM batch size (repetitions shrink to fit)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "otam": bench_otam(device, args.otam_rounds),
        "clipspm_train_step": bench_clipspm(device, [1, 16], 1024, args.step_budget_s),
    }
    if device.type == "cpu":
        report["cpu_kernels"] = bench_cpu_kernels(args.kernel_rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
