"""``fsar train``: episodic training of a head on a feature store (SPEC 6).

One optimizer step = ``tasks_per_batch`` episodes, run ``episode_batch`` at a time (true
batching) with gradient accumulation in between. Validation runs every ``val_every`` steps on a
fixed episode list of ``protocol.selection_split``; ``last.pt`` is written then and ``best.pt``
when the validation accuracy improves. Every random state lives in the checkpoint, so a run
killed at any moment and restarted with the same command ends with the same weights as an
uninterrupted one (bitwise on CPU). SIGINT / SIGTERM stop the loop after the current step with
``last.pt`` written at it; a non-finite loss, parameter or score stops it before anything
non-finite is validated or written (``run_checkpoints`` holds the write order and resume checks).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fsar.atomic import write_atomic
from fsar.cache import open_store
from fsar.cache.bank import FeatureBank, load_bank
from fsar.config import CONFIG_VERSION, Config, ConfigError, check_head_batching, to_dict
from fsar.devices import resolve_device
from fsar.errors import FsarError
from fsar.heads import FewShotHead, episode_loss
from fsar.heads.registry import head_spec
from fsar.interrupts import stop_on_signals
from fsar.pipelines.build import aux_weights, build_head, episode_tensors
from fsar.pipelines.checkpoint import encoder_recipe
from fsar.pipelines.compiled import step_head
from fsar.pipelines.episodes import (
    EpisodeSampler,
    EpisodeShape,
    fixed_episodes,
    train_positions,
)
from fsar.pipelines.evaluate import EvalSetup, NonFiniteScores, evaluate_episodes
from fsar.pipelines.frame_plan import (
    check_store_frames,
    resolve_rule,
    store_frames,
    training_positions,
)
from fsar.pipelines.run_checkpoints import (
    TRAIN_COMPARED,
    check_resumable,
    clean_stray_files,
    kept_files,
    read_last,
    reconcile,
    save_run_checkpoints,
)


class TrainingDiverged(FsarError, RuntimeError):
    """The loss, the parameters or the validation scores became NaN or infinite.

    Nothing non-finite is written; the message says which checkpoints the run leaves."""


@dataclass
class TrainResult:
    out: Path
    steps: int
    best_step: int
    best_accuracy: float  # selection-split accuracy (%) of best.pt
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0


def train_shape(config: Config) -> EpisodeShape:
    ep, pr = config.episodes, config.protocol
    return EpisodeShape(ep.way, pr.train_shot or ep.shot, pr.train_query)


def train_heads(config: Config, progress: bool = True) -> TrainResult:
    """Train (or resume training) ``config.head`` on ``config.train.store``."""
    tr = config.train
    check_head_batching(config)
    if not tr.store:
        raise ConfigError("train.store is not set: pass --store STORE (from fsar extract)")
    if not tr.out:
        raise ConfigError("train.out is not set: pass --out RUN_DIR")
    out = Path(tr.out)
    device = resolve_device(tr.device)
    store = open_store(Path(tr.store))
    seq_len = int(store.recipe["seq_len"])
    dataset = store.recipe.get("dataset")
    check_protocol_frames(config.protocol, store, dataset)
    layer = head_spec(config.head.name).training_inputs(config.head).layer
    layers = [layer] if layer else []
    train_bank = load_bank(store, "train", device, config.protocol.train_views, layers)
    select_bank = load_bank(store, config.protocol.selection_split, device, ["center"], layers)
    sampler = EpisodeSampler(
        train_bank,
        train_shape(config),
        ("episodes.way", "protocol.train_shot (default episodes.shot)", "protocol.train_query"),
    )
    select = EvalSetup(
        select_bank,
        fixed_episodes(
            select_bank,
            EpisodeShape(config.episodes.way, config.episodes.shot, config.episodes.query),
            tr.val_episodes,
            config.eval.seed,
        ),
        seq_len,
        config.protocol.test_frames,
        config.eval.seed,
        dataset,
    )
    train_rule = resolve_rule(config.protocol.train_frames, dataset)
    torch.manual_seed(tr.seed)
    train_classes = torch.unique(train_bank.class_ids)
    head = build_head(
        config.head, train_bank.feature_dim, train_bank.layer_dims, len(train_classes)
    ).to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.Adam(params, lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay)
        if params
        else None
    )
    generator = torch.Generator().manual_seed(tr.seed)
    record = run_record(config, store, train_bank, select)
    state, payload = start_or_resume(out, tr.resume, record, TRAIN_COMPARED)
    if payload is not None:
        restore(payload, head, optimizer, generator, device)
    out.mkdir(parents=True, exist_ok=True)
    MetricLogger.drop_after(out, state.step)  # lines a killed run wrote past its checkpoint
    write_atomic(out / "config.json", (json.dumps(record, indent=2) + "\n").encode())
    steps = tr.steps if optimizer is not None else 0
    logger = MetricLogger(out, enabled=True)
    started, episodes_done = time.perf_counter(), 0
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and tr.bf16
        else nullcontext()
    )
    micro_batches = tr.tasks_per_batch // tr.episode_batch
    model = step_head(head, tr.compile)  # the head, or its compiled step (train.compile)
    saver = Saver(out, head, optimizer, generator, record, state, payload is not None)
    show = progress and optimizer is not None  # a head without parameters has nothing to train
    bar = tqdm(total=steps, initial=state.step, unit="step", desc=f"train {config.head.name}",
               disable=not show)  # fmt: skip
    with stop_on_signals() as stop, bar:
        while state.step < steps:
            head.train()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct, total = 0.0, 0, 0
            for _ in range(micro_batches):
                episodes = sampler.sample(tr.episode_batch, generator)
                positions, views = jitter_used_videos(
                    train_bank, episodes, seq_len, generator, train_rule
                )
                batch = episode_tensors(
                    train_bank, episodes, positions, views.to(device), config.head, True,
                    train_classes,
                )  # fmt: skip
                with autocast:
                    output = model(
                        batch.support,
                        batch.support_labels,
                        batch.query,
                        batch.class_text,
                        query_labels=batch.query_labels,
                        **batch.extras,
                    )
                weights = aux_weights(config.head, set(output.aux))
                loss = episode_loss(output, batch.query_labels, weights)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {state.step + 1}; stopped. Kept: "
                        f"{kept_files(out)} (lower train.lr or check the store with "
                        "fsar cache verify)"
                    )
                (loss * tr.episode_batch / tr.tasks_per_batch).backward()
                loss_sum += loss.item() * tr.episode_batch
                correct += int((output.logits.argmax(-1) == batch.query_labels).sum())
                total += batch.query_labels.numel()
            optimizer.step()
            check_parameters(params, state.step + 1, f"train.lr (now {tr.lr})", out)
            state.step += 1
            episodes_done += tr.tasks_per_batch
            rate = episodes_done / max(time.perf_counter() - started, 1e-9)
            metrics = {
                "step": state.step,
                "loss": loss_sum / tr.tasks_per_batch,
                "train_accuracy": 100.0 * correct / total,
                "episodes_per_s": rate,
            }
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                acc=f"{metrics['train_accuracy']:.1f}",
                eps=f"{rate:.1f}",
            )
            if state.step % tr.log_every == 0:
                logger.log("train", metrics)
            if state.step % tr.val_every == 0 or state.step == steps:
                validate_and_save(model, select, state, logger, config, saver)
            if stop.requested:  # the safe point: the step is done, its state goes to last.pt
                saver.last()
                stop.check(f"kept: {kept_files(out)}")
    if steps == 0 and not (out / "best.pt").exists():  # nothing to train: score it once
        validate_and_save(model, select, state, logger, config, saver)
    logger.close()
    return TrainResult(
        out, state.step, state.best_step, state.best_accuracy, state.history, state.resumed_from
    )


def start_or_resume(
    out: Path, resume: bool, record: dict[str, Any], compared: tuple[str, ...], repair: bool = True
) -> tuple[RunState, dict[str, Any] | None]:
    """A fresh state, or the state and payload of ``out/last.pt`` when the run is resumed.

    ``best.pt`` is repaired first if a kill came between the two checkpoint writes; a run written
    with other settings is refused (``check_resumable`` names each differing key). Ranks other
    than 0 of a distributed run pass ``repair=False``: they read what rank 0 made agree.
    """
    if not resume and out.exists() and any(out.glob("*.pt")):
        raise ConfigError(
            f"{out} already holds checkpoints: pick a new --out or set train.resume=true"
        )
    if repair:
        clean_stray_files(out)
    if not resume:
        return RunState(), None
    payload = reconcile(out) if repair else read_last(out)
    if payload is None:
        return RunState(), None
    check_resumable(out / "last.pt", payload, record, compared)
    return RunState.from_checkpoint(payload), payload


def check_parameters(params, step: int, lr: str, out: Path) -> None:
    """Stop before a diverged state can be validated or saved."""
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise TrainingDiverged(
            f"parameters became NaN or inf at step {step}; stopped, nothing of it was written. "
            f"Kept: {kept_files(out)} (lower {lr})"
        )


class Saver:
    """Writes the run's checkpoints; remembers the step last.pt holds."""

    def __init__(self, out: Path, head, optimizer, generator, record, state, resumed: bool):
        self.out, self.head, self.optimizer, self.generator = out, head, optimizer, generator
        self.record, self.state = record, state
        self.step = state.step if resumed else None

    def save(self, improved: bool) -> None:
        payload = checkpoint_payload(
            self.head, self.optimizer, self.generator, self.state, self.record
        )
        save_run_checkpoints(self.out, payload, improved)
        self.step = self.state.step

    def last(self) -> None:
        """last.pt at the current step, unless it already holds it."""
        if self.step != self.state.step:
            self.save(improved=False)


def check_protocol_frames(protocol, store, dataset: str | None) -> None:
    """A release frame rule needs a dense store: refuse any other before loading anything."""
    frames = store_frames(store.recipe)
    check_store_frames("protocol.test_frames", protocol.test_frames, frames, dataset, store.path)
    check_store_frames("protocol.train_frames", protocol.train_frames, frames, dataset, store.path)


def jitter_used_videos(
    bank: FeatureBank,
    episodes,
    seq_len: int,
    generator: torch.Generator,
    rule: str | None = None,
):
    """Training frames and views for the videos of these episodes only.

    A bank can hold tens of thousands of videos and an episode uses a few dozen, so the draws
    are made for the used rows and scattered into bank-sized tables (long [V, T] and [V]).
    ``rule``: a release training rule over the source frames of a dense store, drawn per
    occurrence (positions are then a (support, query) pair); None: the jitter over cached
    frames of SPEC 3.
    """
    rows = torch.unique(torch.cat([episodes.support.flatten(), episodes.query.flatten()]))
    if rule is not None:  # per occurrence: (support [B, S, T], query [B, Q, T])
        positions = training_positions(bank, episodes, rule, generator)
    else:
        positions = torch.zeros(len(bank), seq_len, dtype=torch.long)
        positions[rows] = train_positions(bank.n_frames.cpu()[rows], seq_len, generator)
        positions = positions.to(bank.device)
    views = torch.zeros(len(bank), dtype=torch.long)
    views[rows] = torch.randint(len(bank.views), (len(rows),), generator=generator)
    return positions, views


@dataclass
class RunState:
    step: int = 0
    best_step: int = -1
    best_accuracy: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> RunState:
        """The state a run resumes with from its last.pt."""
        return cls(
            step=payload["step"],
            best_step=payload["best_step"],
            best_accuracy=payload["best_accuracy"],
            history=list(payload["history"]),
            resumed_from=payload["step"],
        )

    def record_validation(self, result, split: str, logger: MetricLogger) -> bool:
        """Log a validation score at the current step; True when it is the best so far."""
        entry = {
            "step": self.step,
            "split": split,
            "accuracy": result.accuracy,
            "ci95": result.ci95,
        }
        self.history.append(entry)
        logger.log("val", entry)
        improved = result.accuracy > self.best_accuracy
        if improved:
            self.best_step, self.best_accuracy = self.step, result.accuracy
        return improved


def validate_and_save(head, select, state: RunState, logger, config: Config, saver: Saver) -> None:
    try:
        result = evaluate_episodes(head, select, config.head, config.eval.episode_batch)
    except NonFiniteScores as err:
        raise TrainingDiverged(
            f"{err} at step {state.step}; stopped, nothing of it was written. Kept: "
            f"{kept_files(saver.out)} (lower train.lr)"
        ) from err
    improved = state.record_validation(result, config.protocol.selection_split, logger)
    saver.save(improved)


def checkpoint_payload(head, optimizer, generator, state: RunState, record) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "step": state.step,
        "best_step": state.best_step,
        "best_accuracy": state.best_accuracy,
        "history": list(state.history),
        "rng": rng,
        **record,
    }


def run_record(config: Config, store, train_bank: FeatureBank, select) -> dict[str, Any]:
    """What a checkpoint and a report must say about where the numbers came from."""
    recipe = store.recipe
    return {
        "config": to_dict(config),
        "config_version": CONFIG_VERSION,
        "protocol": to_dict(config.protocol),
        "head_name": config.head.name,
        "feature_dim": train_bank.feature_dim,
        "layer_dims": train_bank.layer_dims,
        "num_train_classes": int(torch.unique(train_bank.class_ids).numel()),
        "store": {
            "path": str(store.path),
            "fingerprint": store.fingerprint,
            "dataset": recipe.get("dataset"),
            "variant": config.dataset.variant,
            "encoder": encoder_recipe(recipe),
            "frames": recipe.get("frames"),
            "seq_len": recipe.get("seq_len"),
            "train_videos": len(train_bank),
            "train_videos_skipped": train_bank.skipped,
        },
        "selection": {
            "split": config.protocol.selection_split,
            "episodes": len(select.episodes),
            "episodes_sha256": select.episodes.digest(),
        },
    }


def restore(payload: dict[str, Any], head: FewShotHead, optimizer, generator, device) -> None:
    """Weights, optimizer and every random state of a last.pt, for an exact resume."""
    head.load_state_dict(payload["head"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    generator.set_state(payload["rng"]["generator"])
    torch.set_rng_state(payload["rng"]["torch"])
    if "cuda" in payload["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])


class MetricLogger:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars in the run directory."""

    def __init__(self, out: Path, enabled: bool = True):
        self.path = out / "metrics.jsonl"
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    @staticmethod
    def drop_after(out: Path, step: int) -> None:
        path = out / "metrics.jsonl"
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
            write_atomic(path, "".join(line + "\n" for line in kept).encode())

    def log(self, kind: str, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"kind": kind, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a line torn by a kill
        return None
