"""Benchmark of the few-shot heads; writes one JSON file.

Measures, in one run:
1. OTAM (bidirectional) forward+backward of fsar against a straightforward double loop over the
   DP cells (written below, vectorised over pairs only, as the releases do), on
   dists [B=16, Q=20, N=5, T=8, T=8];
2. CLIP-SPM training steps (forward with query labels, loss, backward, Adam step) in episodes/s at
   B=1 and B=16, dim 1024 and the release sizes, 5-way 1-shot with 4 queries per class, T=8;
3. on CPU, the CLIP-SPM training step of the pipeline benchmark (64-d features, widths 2x the
   features, B=16) with fsar's CPU kernels (dropout masks, OTAM log-add-exp) against
   the same step with the library kernels they replace, alternating, and each kernel alone;
4. every registered head (`fsar.heads.registry.HEADS`) with its default (release) options at
   D = 1024 (RN50) and D = 512 (ViT-B/16): training episodes/s (the step of `fsar train`: forward
   with query labels and the training inputs the spec declares, `episode_loss` with the spec's
   loss weights, backward, Adam) and evaluation episodes/s (eval mode, no_grad), with the episode
   shapes and batch sizes of fsar's defaults (5-way 1-shot, T=8; training 4 queries per class,
   16 episodes per forward; evaluation 1 query per class, 100 episodes per forward).

Usage: python benchmarks/heads.py [--out PATH] [--device cpu|cuda] [--only PART]
(PART: otam, clipspm, kernels or registry; the default runs all and writes
benchmarks/results/heads.json, one part writes benchmarks/results/heads_PART.json)
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

from fsar.config import EpisodeConfig, EvalConfig, ProtocolConfig, TrainConfig  # noqa: E402
from fsar.heads import CLIPSPMHead, blocks, episode_loss, otam, otam_bidirectional  # noqa: E402
from fsar.heads.registry import HEADS  # noqa: E402
from fsar.heads.spec import BuildContext, HeadConfig, HeadSpec  # noqa: E402
from fsar.pipelines.build import aux_weights  # noqa: E402


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


RELEASE_DIMS = (1024, 512)  # RN50, ViT-B/16 feature widths
NUM_TRAIN_CLASSES = 64  # rows of the training text table (and of per-class classifiers)


def registry_inputs(
    spec: HeadSpec,
    config: HeadConfig,
    dim: int,
    batch: int,
    query_per_class: int,
    training: bool,
    device: torch.device,
) -> tuple[dict, dict[str, int]]:
    """Random features for B episodes of fsar's default shape, as `head(**inputs)` takes them,
    and the layer widths the head is built with. Training adds query labels and the inputs the
    spec declares (class ids into a text table of the training classes, shallow layer frames)."""
    episode, frames = EpisodeConfig(), 8
    way, shot = episode.way, episode.shot
    g = torch.Generator().manual_seed(dim + batch)
    support_labels = torch.arange(way).repeat_interleave(shot).repeat(batch, 1)  # [B, S]
    query_labels = torch.arange(way).repeat_interleave(query_per_class).repeat(batch, 1)  # [B, Q]
    text_table = torch.randn(NUM_TRAIN_CLASSES, dim, generator=g)  # [C_train, D]
    # each episode's classes: `way` distinct training classes, episode label n -> classes[:, n]
    classes = torch.rand(batch, NUM_TRAIN_CLASSES, generator=g).argsort(-1)[:, :way]  # [B, N]
    inputs = {
        "support": torch.randn(batch, way * shot, frames, dim, generator=g),
        "support_labels": support_labels,
        "query": torch.randn(batch, way * query_per_class, frames, dim, generator=g),
        "class_text": text_table[classes],  # [B, N, D]
    }
    needs = spec.training_inputs(config)
    layer_dims = {needs.layer: dim} if needs.layer is not None else {}
    if training:
        inputs["query_labels"] = query_labels
        if needs.class_ids:
            inputs["support_class_ids"] = classes.gather(1, support_labels)
            inputs["query_class_ids"] = classes.gather(1, query_labels)
            inputs["text_table"] = text_table
        if needs.layer is not None:
            inputs["support_shallow"] = torch.randn_like(inputs["support"])
            inputs["query_shallow"] = torch.randn_like(inputs["query"])
    return {k: v.to(device) for k, v in inputs.items()}, layer_dims


def episodes_per_s(step, episodes: int, device: torch.device, budget_s: float) -> dict:
    """Rate of `step` (which handles `episodes` episodes): warm-up, then timed calls until about
    `budget_s` has passed (at least one, at most 50); the median call sets the rate.

    On CPU also the rate per CPU second of this process (user + system time of all its threads):
    on a machine shared with other processes it moves much less than the wall-clock rate, and
    with one thread it is the rate of an idle core."""
    start = time.perf_counter()
    step()  # warm-up: allocations, Adam's state
    _sync(device)
    warmup = time.perf_counter() - start
    if warmup < budget_s / 10:
        step()
        _sync(device)
    wall: list[float] = []
    cpu: list[float] = []
    while not wall or (sum(wall) < budget_s and len(wall) < 50):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    wall.sort()
    cpu.sort()
    median = wall[len(wall) // 2]
    rates = {"episodes_per_s": round(episodes / median, 2), "median_s": median}
    if device.type == "cpu":
        rates["episodes_per_cpu_s"] = round(episodes / cpu[len(cpu) // 2], 2)
    return {**rates, "calls": len(wall), "warmup_s": round(warmup, 3)}


def bench_registry(device: torch.device, dims: tuple[int, ...], budget_s: float) -> dict:
    """Training and evaluation episodes/s of every registered head with its default options."""
    train, evaluation = TrainConfig(), EvalConfig()
    train_query, test_query = ProtocolConfig().train_query, EpisodeConfig().query
    load = {"start": os.getloadavg()}
    results = {}
    for name, spec in HEADS.items():
        for dim in dims:
            config = spec.config()
            row: dict = {"loadavg_1min": round(os.getloadavg()[0], 2)}  # a shared machine
            inputs, layer_dims = registry_inputs(
                spec, config, dim, train.episode_batch, train_query, True, device
            )
            torch.manual_seed(0)
            head = spec.build(config, BuildContext(dim, layer_dims, NUM_TRAIN_CLASSES)).to(device)
            params = [p for p in head.parameters() if p.requires_grad]
            row["parameters"] = sum(p.numel() for p in params)
            if params:  # `fsar train`'s optimizer and loss weights
                optimizer = torch.optim.Adam(
                    params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay
                )
                head.train()

                def train_step(head=head, inputs=inputs, optimizer=optimizer, config=config):
                    optimizer.zero_grad(set_to_none=True)
                    out = head(**inputs)
                    weights = aux_weights(config, set(out.aux))
                    episode_loss(out, inputs["query_labels"], weights).backward()
                    optimizer.step()

                row["train"] = episodes_per_s(train_step, train.episode_batch, device, budget_s)
                del optimizer
            del inputs
            inputs, _ = registry_inputs(
                spec, config, dim, evaluation.episode_batch, test_query, False, device
            )
            head.eval()

            @torch.no_grad()
            def eval_step(head=head, inputs=inputs):
                head(**inputs)

            row["eval"] = episodes_per_s(eval_step, evaluation.episode_batch, device, budget_s)
            results[f"{name} D={dim}"] = row
            rates = {
                mode: row[mode].get("episodes_per_s") for mode in ("train", "eval") if mode in row
            }
            print(f"{name} D={dim}: {rates}", file=sys.stderr)
            del head, inputs
    load["end"] = os.getloadavg()
    return {
        "setting": {
            **dict(way=EpisodeConfig().way, shot=EpisodeConfig().shot, T=8, dtype="float32"),
            "train": f"{train.episode_batch} episodes per forward, {train_query} queries per "
            f"class; forward(train, query_labels, the spec's training inputs; text table of "
            f"{NUM_TRAIN_CLASSES} classes) + episode_loss(aux_weights as fsar train merges "
            f"them); backward; Adam(lr {train.lr}, betas {tuple(train.betas)}, weight decay "
            f"{train.weight_decay}); parameter-free heads: none",
            "eval": f"{evaluation.episode_batch} episodes per forward, {test_query} query per "
            "class; eval mode, no_grad",
            "timing": f"warm-up, then timed calls for about {budget_s} s (at least 1, at most "
            "50); rate = episodes per call / median call (wall clock; on CPU also per CPU "
            "second of this process)",
        },
        "loadavg_1_5_15min": {k: [round(x, 2) for x in v] for k, v in load.items()},
        "results": results,
    }


PARTS = ("otam", "clipspm", "kernels", "registry")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        help="JSON output path (default benchmarks/results/heads.json, or heads_PART.json)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=PARTS, help="run one part only")
    parser.add_argument("--otam-rounds", type=int, default=10)
    parser.add_argument("--kernel-rounds", type=int, default=7, help="CPU kernel comparison")
    parser.add_argument(
        "--step-budget-s",
        type=float,
        default=25.0,
        help="rough time per CLIP-SPM batch size (repetitions shrink to fit)",
    )
    parser.add_argument(
        "--registry-budget-s",
        type=float,
        default=1.0,
        help="rough timed seconds per head, width and mode in the registry sweep",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    parts = [args.only] if args.only else list(PARTS)
    if device.type != "cpu" and "kernels" in parts:
        parts.remove("kernels")  # fsar's CPU kernels only
    out = Path(args.out or f"benchmarks/results/heads{'_' + args.only if args.only else ''}.json")
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if "otam" in parts:
        report["otam"] = bench_otam(device, args.otam_rounds)
    if "clipspm" in parts:
        report["clipspm_train_step"] = bench_clipspm(device, [1, 16], 1024, args.step_budget_s)
    if "kernels" in parts:
        report["cpu_kernels"] = bench_cpu_kernels(args.kernel_rounds)
    if "registry" in parts:
        started = time.perf_counter()
        report["registry"] = bench_registry(device, RELEASE_DIMS, args.registry_budget_s)
        report["registry"]["sweep_s"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
