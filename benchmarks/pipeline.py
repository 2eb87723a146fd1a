"""Training throughput: heads on cached features (fsar) vs. the release-style loop, one run.

Both sides train the same head (config, initial weights, Adam) on the rendered demo dataset's
training split: fsar calls ``train_heads`` on a store extracted once; the release-style loop
decodes the support and query videos of every episode in DataLoader workers (the releases'
training frame jitter, center view), encodes their frames with the open_clip image encoder in
the main process, then runs the head step. Its episodes are the first ones of fsar's seeded
training stream. Rates are per episode, so the baseline runs fewer episodes; the two alternate
in rounds so that load from other processes hits both alike. Also times 10,000-episode
evaluations on the test split. Writes JSON; absolute numbers only mean something on the machine
recorded with them, the ratio is the claim.

    python benchmarks/pipeline.py [--out benchmarks/results/pipeline.json] [--device auto]
        [--widths rn50|vitb16] [--head clipspm|clipfsar] [--set KEY=VALUE ...]
        [--model fsar-tiny-vit]   (RN50 with random weights on a GPU: --model RN50)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fsar.cache import FeatureStore, open_store
from fsar.cache.bank import FeatureBank, load_bank
from fsar.config import Config, HeadConfig, load_config
from fsar.data.datasets import load_dataset
from fsar.data.frames import train_frame_positions
from fsar.data.synthetic import DemoSpec, render_demo_dataset
from fsar.data.transforms import Preprocess, apply_view
from fsar.data.video import open_source
from fsar.devices import resolve_device
from fsar.extract.encoders import TINY_MODELS, EncoderSpec, build_encoder
from fsar.extract.runner import run_extraction
from fsar.heads import episode_loss
from fsar.heads.registry import head_config as registered_config
from fsar.heads.registry import head_spec
from fsar.pipelines.build import aux_weights, build_head
from fsar.pipelines.checkpoint import load_checkpoint
from fsar.pipelines.episodes import EpisodeIndex, EpisodeSampler, EpisodeShape, fixed_episodes
from fsar.pipelines.evaluate import EvalSetup, evaluate_episodes
from fsar.pipelines.loop import train_shape
from fsar.pipelines.train import jitter_used_videos, train_heads

# The release's CLIP-SPM head has fixed widths (8 heads x 256, MLP and prompt hidden 2048): twice
# the RN50 feature width (1024), four times ViT-B/16's (512). The tiny model's features are 64-d,
# so the benchmarked head keeps one of those two ratios to D (the release-size head on 64-d
# features would be 32x wider than its input, which no backbone has).
WIDTH_RATIOS = {"rn50": 2, "vitb16": 4}


def scaled_head(head: str, ratio: int, dim: int) -> list[str]:
    """Overrides for a head `ratio` times as wide as the `dim`-d features (8 attention heads):
    the MLP, prompt and attention-head widths among `head`'s own options."""
    width = ratio * dim
    wanted = {"mlp_dim": width, "prompt_hidden": width, "dim_head": width // 8}
    options = {field.name for field in dataclasses.fields(head_spec(head).config)}
    return [f"head.{key}={value}" for key, value in wanted.items() if key in options]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extract_demo(work: Path, model: str, device: str) -> tuple[Path, Path, float]:
    """Render the demo dataset and extract it once; returns (videos, store, extract seconds)."""
    videos = render_demo_dataset(work / "videos").root
    store = work / "store.zarr"
    settings = {"dataset.name": "demo", "dataset.root": videos, "model.name": model}
    settings["model.random_init"] = str(model not in TINY_MODELS).lower()
    settings.update({"extract.out": store, "extract.device": device})
    config = load_config([], [f"{key}={value}" for key, value in settings.items()])
    start = time.perf_counter()
    run_extraction(config, progress=False)
    return videos, store, time.perf_counter() - start


def fsar_round(config: Config, out: Path, device: torch.device) -> dict:
    """One ``train_heads`` call into ``out``; also its own loop-only rate from metrics.jsonl."""
    config = replace(config, train=replace(config.train, out=str(out)))
    start = time.perf_counter()
    result = train_heads(config, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last_train = [json.loads(line) for line in lines if '"kind": "train"' in line][-1]
    episodes = result.steps * config.train.tasks_per_batch
    rates = dict(episodes_per_s=round(episodes / seconds, 2))
    rates["loop_episodes_per_s"] = round(last_train["episodes_per_s"], 2)
    return {"episodes": episodes, "seconds": round(seconds, 3), **rates}


def training_stream(config: Config, bank: FeatureBank, seq_len: int, count: int) -> EpisodeIndex:
    """The first ``count`` episodes ``train_heads`` trains on: its generator draws, replayed."""
    tr = config.train
    sampler = EpisodeSampler(bank, train_shape(config))
    generator = torch.Generator().manual_seed(tr.seed)
    parts = []
    while sum(len(part) for part in parts) < count:
        parts.append(sampler.sample(tr.episode_batch, generator))
        # train_heads draws frame jitter and views after every batch: consume the same numbers
        jitter_used_videos(bank, parts[-1], seq_len, generator)
    fields = ("support", "support_labels", "query", "query_labels", "classes")
    joined = [torch.cat([getattr(part, name) for part in parts])[:count] for name in fields]
    return EpisodeIndex(*joined)


class EpisodeVideos(torch.utils.data.Dataset):
    """The release's data side: item e = the decoded, transformed clips of episode e.

    Decoded in DataLoader workers, as the releases do. Frame jitter is drawn from a generator
    seeded per episode, so it does not depend on which worker decodes which episode.
    """

    def __init__(self, episodes: EpisodeIndex, paths: list[Path], prep: Preprocess, seq_len: int):
        self.episodes, self.paths, self.prep, self.seq_len = episodes, paths, prep, seq_len

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, e: int) -> torch.Tensor:
        jitter = torch.Generator().manual_seed(1_000_003 * (e + 1))
        rows = torch.cat([self.episodes.support[e], self.episodes.query[e]]).tolist()
        clips = []
        for row in rows:
            source = open_source(self.paths[row], threads=1)
            n = torch.tensor([source.num_frames])
            picks = train_frame_positions(n, self.seq_len, jitter)[0].tolist()
            clips.append(apply_view(source.read(picks), "center", self.prep))  # [T, 3, H, W]
        return torch.stack(clips)  # [S+Q, T, 3, H, W]


@dataclass
class ReleaseStyleLoop:
    """The per-episode loop of the releases, with train_heads' head, weights and optimizer."""

    config: Config
    bank: FeatureBank
    paths: list[Path]  # bank row -> video file
    recipe: dict  # the store's extraction recipe: the same model and pixels
    device: torch.device
    workers: int  # DataLoader workers decoding episodes
    done: int = 0  # episodes trained so far (an Adam step every tasks_per_batch)

    def __post_init__(self) -> None:
        tr, model = self.config.train, self.recipe["model"]
        self.encoder = build_encoder(
            EncoderSpec(model, random_init=model not in TINY_MODELS), device=self.device
        )
        r = self.recipe
        self.prep = Preprocess(r["resize"], r["crop"], r["normalize"], r["interpolation"])
        torch.manual_seed(tr.seed)  # the initial weights of train_heads' head
        self.head = build_head(self.config.head, self.bank.feature_dim, {}).to(self.device)
        params = [p for p in self.head.parameters() if p.requires_grad]
        adam = dict(lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay)
        self.optimizer = torch.optim.Adam(params, **adam)

    def train(self, episodes: EpisodeIndex) -> dict[str, float]:
        """Train on ``episodes`` one at a time; returns seconds per part of the loop.

        A fresh DataLoader per call (its worker start-up is counted in ``wait_for_data``), so
        no worker decodes ahead while the other side of the benchmark runs.
        """
        tr, seq_len, device = self.config.train, int(self.recipe["seq_len"]), self.device
        on_gpu = device.type == "cuda"
        encode_cast = torch.autocast("cuda", dtype=torch.float16) if on_gpu else nullcontext()
        head_cast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and tr.bf16 else nullcontext()
        )
        parts = {"wait_for_data": 0.0, "encode": 0.0, "head_step": 0.0}
        n_support = episodes.support.shape[1]
        self.head.train()
        loader = torch.utils.data.DataLoader(
            EpisodeVideos(episodes, self.paths, self.prep, seq_len),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=on_gpu,
        )
        t0 = time.perf_counter()
        for e, pixels in enumerate(loader):
            pixels = pixels.to(device, non_blocking=True)  # [S+Q, T, 3, H, W]
            t1 = time.perf_counter()
            with torch.no_grad(), encode_cast:  # favours the baseline: no backbone backward
                feats = self.encoder.model.encode_image(pixels.flatten(0, 1)).float()
            feats = feats.view(pixels.shape[0], seq_len, -1)  # [S+Q, T, D]
            sync(device)
            t2 = time.perf_counter()
            query_labels = episodes.query_labels[e : e + 1].to(device)  # [1, Q]
            with head_cast:
                output = self.head(
                    feats[None, :n_support],
                    episodes.support_labels[e : e + 1].to(device),
                    feats[None, n_support:],
                    self.bank.class_text[episodes.classes[e].to(device)][None],  # [1, N, D]
                    query_labels=query_labels,
                )
            weights = aux_weights(self.config.head, set(output.aux))
            (episode_loss(output, query_labels, weights) / tr.tasks_per_batch).backward()
            self.done += 1
            if self.done % tr.tasks_per_batch == 0:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            sync(device)
            t3 = time.perf_counter()
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[name] += seconds
            t0 = time.perf_counter()
        return parts


def interleaved_rounds(
    config: Config, loop: ReleaseStyleLoop, episodes: EpisodeIndex, work: Path, rounds: int
) -> tuple[list[dict], list[dict]]:
    """Alternate a fsar run and a slice of the baseline's episodes, so that load from other
    processes on a shared machine hits both sides alike."""
    per_round = -(-len(episodes) // rounds)
    fsar, baseline = [], []
    for r in range(rounds):
        fsar.append(fsar_round(config, work / f"run{r}", loop.device))
        chunk = episodes.slice(r * per_round, min((r + 1) * per_round, len(episodes)))
        start = time.perf_counter()
        parts = loop.train(chunk)
        seconds = time.perf_counter() - start
        by_part = {name: round(value, 3) for name, value in parts.items()}
        rate = round(len(chunk) / seconds, 3)
        baseline.append(dict(episodes=len(chunk), seconds=round(seconds, 3), episodes_per_s=rate))
        baseline[-1]["seconds_by_part"] = by_part
    return fsar, baseline


def summarize(rounds: list[dict], keys: tuple[str, ...]) -> dict:
    """Totals over rounds, rates as total episodes / total seconds, plus the median round."""
    episodes = sum(r["episodes"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    out = {"episodes": episodes, "seconds": round(seconds, 3)}
    out["episodes_per_s"] = round(episodes / seconds, 3)
    for key in keys:
        values = sorted(r[key] for r in rounds)
        out[f"median_round_{key}"] = values[len(values) // 2]
    return out


def evaluation_wall_time(
    config: Config,
    store: FeatureStore,
    device: torch.device,
    heads: dict[str, tuple[torch.nn.Module, HeadConfig]],
    count: int,
) -> dict:
    """Wall time of ``evaluate_episodes`` over ``count`` fixed test episodes, per head."""
    start = time.perf_counter()
    bank = load_bank(store, "test", device)
    ep, seed, batch = config.episodes, config.eval.seed, config.eval.episode_batch
    shape = EpisodeShape(ep.way, ep.shot, ep.query)
    episodes = fixed_episodes(bank, shape, count, seed)
    setup = EvalSetup(bank, episodes, int(store.recipe["seq_len"]), "cached", seed)
    report = dict(episodes=count, shape=str(shape), test_videos=len(bank), episode_batch=batch)
    report["setup_seconds"] = round(time.perf_counter() - start, 3)
    for name, (head, head_config) in heads.items():
        head = head.to(device)
        start = time.perf_counter()
        outcome = evaluate_episodes(head, setup, head_config, batch)
        sync(device)
        seconds, size = time.perf_counter() - start, sum(p.numel() for p in head.parameters())
        report[name] = dict(seconds=round(seconds, 3), accuracy=round(outcome.accuracy, 2))
        report[name]["parameters"] = size
    return report


NOTES = {
    "fsar": "each round is a whole train_heads call (store open, bank loads, head build, the "
    "steps, one validation of val_episodes, checkpoint writes, logging); loop_episodes_per_s "
    "is train_heads' own rate, first step start to last step end",
    "release_style": "DataLoader workers (one per core, as the releases use workers) decode "
    "each support/query video of an episode (train frame jitter over its frames) and apply the "
    "center view; the main process runs encode_image, head forward/backward, Adam every "
    "tasks_per_batch episodes; encoder and head built beforehand, worker start-up counted in "
    "wait_for_data",
    "release_style_favoured_by": "encoder under torch.no_grad() (the releases back-propagate "
    "into it); class text from the store (computed once)",
    "episode_counts": "the baseline trains on the first episodes of fsar's seeded training "
    "stream (each fsar round replays it); rates are per episode, so fewer baseline episodes "
    "compare like with like",
    "extract": "run_extraction over all splits, rendering excluded; paid once per store",
    "evaluation": "evaluate_episodes only (positions, gathers, forward); setup = test bank load "
    "+ episode list. On CPU with 64-d features this is indicative only: the release-size "
    "head's cost grows with the feature width (1024 RN50, 512 ViT-B/16)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/pipeline.json")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--model", default="fsar-tiny-vit")
    parser.add_argument("--head", default="clipspm", help="head.name of the benchmarked head")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="config overrides applied after the widths of --widths, "
        "e.g. head.mlp_dim=2048 episodes.shot=5",
    )
    parser.add_argument(
        "--widths",
        default="rn50",
        choices=sorted(WIDTH_RATIOS),
        help="head widths as a multiple of the feature width, as in the release with that "
        "backbone: rn50 = 2x (MLP, prompt hidden, 8 x dim_head), vitb16 = 4x",
    )
    parser.add_argument("--fsar-episodes", type=int, default=2048, help="over all rounds")
    parser.add_argument("--baseline-episodes", type=int, default=128, help="over all rounds")
    parser.add_argument(
        "--workers", type=int, default=None, help="baseline DataLoader workers (default: cores)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved fsar/baseline rounds")
    parser.add_argument("--eval-episodes", type=int, default=10000)
    parser.add_argument("--tasks-per-batch", type=int, default=16)
    parser.add_argument("--val-episodes", type=int, default=10)
    args = parser.parse_args()
    if args.head in ("otam", "proto_mean"):  # train_heads runs no steps for parameter-free heads
        parser.error(f"--head {args.head} has no parameters to train; use clipspm or clipfsar")
    device = resolve_device(args.device)
    steps = max(1, args.fsar_episodes // (args.rounds * args.tasks_per_batch))
    load = {"start": os.getloadavg()}  # other processes on a small machine move CPU timings
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        videos, store_path, extract_seconds = extract_demo(work, args.model, str(device))
        train = dict(store=store_path, device=device, steps=steps, val_every=steps)
        train.update(tasks_per_batch=args.tasks_per_batch, episode_batch=args.tasks_per_batch)
        train.update(log_every=steps, val_episodes=args.val_episodes)  # one log line, at the end
        feature_dim = open_store(store_path).layout.feature_dim
        widths = scaled_head(args.head, WIDTH_RATIOS[args.widths], feature_dim)
        overrides = [f"head.name={args.head}", *widths, *args.set]
        config = load_config([], overrides + [f"train.{k}={v}" for k, v in train.items()])
        store = open_store(store_path)
        recipe = store.recipe
        bank = load_bank(store, "train", device, config.protocol.train_views)
        by_id = {item.video_id: item.path for item in load_dataset("demo", videos).items}
        paths = [by_id[video_id] for video_id in bank.video_ids]
        episodes = training_stream(config, bank, int(recipe["seq_len"]), args.baseline_episodes)
        workers = args.workers if args.workers is not None else os.cpu_count() or 1
        loop = ReleaseStyleLoop(config, bank, paths, recipe, device, workers)
        fsar_rounds, baseline_rounds = interleaved_rounds(config, loop, episodes, work, args.rounds)
        load["after_training"] = os.getloadavg()
        trained = build_head(config.head, bank.feature_dim, {})
        trained.load_state_dict(load_checkpoint(work / f"run{args.rounds - 1}/last.pt")["head"])
        release = registered_config("clipspm")  # release sizes: 8 x 256, MLP/prompt 2048
        torch.manual_seed(config.train.seed)
        heads = {"benchmarked_head": (trained, config.head)}
        heads["release_size_clipspm"] = (build_head(release, bank.feature_dim, {}), release)
        evaluation = evaluation_wall_time(config, store, device, heads, args.eval_episodes)
        load["end"] = os.getloadavg()
    fsar = summarize(fsar_rounds, ("episodes_per_s", "loop_episodes_per_s"))
    baseline = summarize(baseline_rounds, ("episodes_per_s",))
    # per-episode means; encode and head step share the cores with the decoding workers
    n_baseline = baseline["episodes"]
    baseline["ms_per_episode_by_part"] = {
        part: round(1000 * sum(r["seconds_by_part"][part] for r in baseline_rounds) / n_baseline, 1)
        for part in baseline_rounds[0]["seconds_by_part"]
    }
    report = {
        "benchmark": "pipeline",
        "model": args.model,
        "feature_dim": bank.feature_dim,
        "seq_len": int(recipe["seq_len"]),
        "image_size": recipe["image_size"],
        "dataset": {**asdict(DemoSpec()), "train_videos": len(bank)},
        "extract_seconds": round(extract_seconds, 2),
        "head": {k: v for k, v in asdict(config.head).items() if k != "aux_weights"},
        "widths": f"{args.widths}: {WIDTH_RATIOS[args.widths]}x the feature width",
        "overrides": [*widths, *args.set],
        "train_episode_shape": str(train_shape(config)),
        "eval_episode_shape": evaluation.pop("shape"),
        **dict(tasks_per_batch=args.tasks_per_batch, fsar_episode_batch=args.tasks_per_batch),
        **dict(baseline_episode_batch=1, rounds=args.rounds, val_episodes=args.val_episodes),
        "baseline_workers": workers,
        "speedup": round(fsar["episodes_per_s"] / baseline["episodes_per_s"], 1),
        "speedup_median_rounds": round(
            fsar["median_round_episodes_per_s"] / baseline["median_round_episodes_per_s"], 1
        ),
        "fsar": {**fsar, "rounds": fsar_rounds},
        "release_style": {**baseline, "rounds": baseline_rounds},
        "release_style_encoder_precision": "float16" if device.type == "cuda" else "float32",
        "evaluation": evaluation,
        "notes": NOTES,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_1_5_15min": {k: [round(x, 2) for x in v] for k, v in load.items()},
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
