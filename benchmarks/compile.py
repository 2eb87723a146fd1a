"""``train.compile``: the CLIP-SPM step compiled against eager, and what compiling costs.

The step of the pipeline benchmark (``benchmarks/pipeline.py``): CLIP-SPM at twice the feature
width (8 heads x 16, MLP and prompt hidden 128) on 64-d features, B=16 episodes of 5-way 1-shot
4-query, T=8; forward with query labels, loss, backward, Adam. Measures, in one process:

1. the compile cost: the first compiled training step and the first evaluation call (100
   episodes of 5-way 1-shot 1-query), with an empty inductor cache (what a first run pays),
   then again after ``torch._dynamo.reset()`` with the cache filled (what a later run pays);
2. steps per second, eager and compiled alternating in rounds (other load hits both alike),
   and the evaluation forward likewise;
3. the losses of the same training steps, eager and compiled, from the same weights and seed.

    python benchmarks/compile.py [--out benchmarks/results/compile.json] [--backend inductor]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsar.heads import BuildContext, build_head, episode_loss  # noqa: E402
from fsar.heads.registry import head_config  # noqa: E402
from fsar.pipelines.compiled import CompiledHead  # noqa: E402

D, T, WAY = 64, 8, 5
WIDTHS = dict(heads=8, dim_head=16, mlp_dim=128, prompt_hidden=128)
WEIGHTS = {"motion_consistency": 0.001}


def episodes(b: int, shot: int, query: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    support_labels = torch.arange(WAY).repeat(shot).expand(b, -1).contiguous()
    query_labels = torch.arange(WAY).repeat(query).expand(b, -1).contiguous()
    class_text = torch.randn(b, WAY, D, generator=g)
    support = torch.randn(b, WAY * shot, T, D, generator=g) + class_text[:, :, None].repeat(
        1, shot, 1, 1
    )
    query_feats = torch.randn(b, WAY * query, T, D, generator=g) + class_text[:, :, None].repeat(
        1, query, 1, 1
    )
    return (support, support_labels, query_feats, class_text), query_labels


class Run:
    """One head, its Adam and the model called (the head or its CompiledHead)."""

    def __init__(self, backend: str | None):
        torch.manual_seed(0)
        self.head = build_head(head_config("clipspm", **WIDTHS), BuildContext(D, {}, 10))
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=1e-4)
        self.model = self.head if backend is None else CompiledHead(self.head, backend)

    def train_step(self, inputs, labels) -> float:
        self.head.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = episode_loss(self.model(*inputs, query_labels=labels), labels, WEIGHTS)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def evaluate(self, inputs) -> torch.Tensor:
        self.head.eval()
        return self.model(*inputs).logits


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compile_costs(backend: str, train, evaluation) -> dict:
    run = Run(backend)
    torch.manual_seed(1)
    return {
        "first_training_step_s": round(seconds(lambda: run.train_step(*train)), 2),
        "first_evaluation_call_s": round(seconds(lambda: run.evaluate(evaluation)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/compile.json")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    args = parser.parse_args()
    load = {"start": os.getloadavg()}
    train = episodes(16, 1, 4, seed=0)
    evaluation, _ = episodes(100, 1, 1, seed=1)
    report: dict = {"backend": args.backend}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles
        report["compile_empty_cache"] = compile_costs(args.backend, train, evaluation)
        torch._dynamo.reset()
        report["compile_filled_cache"] = compile_costs(args.backend, train, evaluation)
        load["after_compile"] = os.getloadavg()

        eager, compiled = Run(None), Run(args.backend)  # same initial weights
        losses = {"eager": [], "compiled": []}
        for name, run in (("eager", eager), ("compiled", compiled)):
            torch.manual_seed(2)
            losses[name] = [run.train_step(*train) for _ in range(args.steps)]
        difference = max(
            abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"], strict=True)
        )
        times = {"eager": [], "compiled": []}
        eval_times = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for name, run in (("eager", eager), ("compiled", compiled)):
                times[name].append(
                    seconds(lambda run=run: [run.train_step(*train) for _ in range(args.steps)])
                    / args.steps
                )
                eval_times[name].append(seconds(lambda run=run: run.evaluate(evaluation)))
    load["end"] = os.getloadavg()

    def summary(values: list[float], per: str) -> dict:
        ordered = sorted(values)
        return {f"median_{per}": round(1000 * ordered[len(ordered) // 2], 1), "rounds": len(values)}

    report["training_step_ms"] = {k: summary(v, "ms") for k, v in times.items()}
    report["training_speedup_median"] = round(
        sorted(times["eager"])[args.rounds // 2] / sorted(times["compiled"])[args.rounds // 2], 2
    )
    report["evaluation_100_episodes_ms"] = {k: summary(v, "ms") for k, v in eval_times.items()}
    report["evaluation_speedup_median"] = round(
        sorted(eval_times["eager"])[args.rounds // 2]
        / sorted(eval_times["compiled"])[args.rounds // 2],
        2,
    )
    report["loss_max_relative_difference"] = difference
    report["losses"] = {k: [round(x, 6) for x in v] for k, v in losses.items()}
    report.update(
        step="clipspm 2x widths (8 x 16, MLP/prompt 128), D=64, T=8, B=16 x 5-way 1-shot 4-query",
        evaluation="forward of 100 episodes 5-way 1-shot 1-query, no_grad, eval mode",
        device="cpu",
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        loadavg_1_5_15min={k: [round(x, 2) for x in v] for k, v in load.items()},
        platform=platform.platform(),
        torch=torch.__version__,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
