"""The one training loop of ``fsar train`` and ``fsar finetune`` (SPEC 6).

A command builds its model, optimizer, micro-batches and validation into a ``TrainingJob``.
``open_run`` starts the run or resumes ``last.pt`` (refusing other settings); ``run_steps``
accumulates the micro-batches of each optimizer step, stops on a non-finite loss or parameter
before anything of that step is validated or written, logs metrics, validates every
``train.val_every`` steps with ``last.pt`` and (when it improves) ``best.pt`` written through
``save_run_checkpoints``, and stops after the current step on SIGINT / SIGTERM with ``last.pt``
written at it. Under ``torchrun`` (``Ranks``) rank 0 alone logs, validates and writes, losses
and signals are agreed over the ranks, and gradients are all-reduced on the last micro-batch
only; with one process these hooks do nothing. Both commands also draw their training episodes
(``train_sampler``), their validation episodes (``selection_episodes``) and write their run
record (``run_record``) here, so those agree between them by construction.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from fsar.atomic import write_atomic
from fsar.config import CONFIG_VERSION, Config, ConfigError, to_dict
from fsar.errors import FsarError
from fsar.extract.distributed import DistContext, barrier
from fsar.interrupts import Interrupted, stop_on_signals
from fsar.pipelines.episodes import EpisodeIndex, EpisodeSampler, EpisodeShape, fixed_episodes
from fsar.pipelines.evaluate import NonFiniteScores
from fsar.pipelines.run_checkpoints import (
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
    world_size: int = 1
    rank: int = 0


@dataclass(frozen=True)
class Ranks:
    """The processes of a run; the default, one process, makes every hook a no-op."""

    dist: DistContext = DistContext()
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL: CUDA tensors only)
    no_sync: Callable[[], AbstractContextManager] = nullcontext  # DDP: no gradient all-reduce

    @property
    def writer(self) -> bool:
        """Rank 0: the one that logs, validates and writes files."""
        return self.dist.rank == 0

    def barrier(self) -> None:
        barrier(self.dist)

    def summed(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over ranks."""
        return self._reduced(values, torch_dist.ReduceOp.SUM)

    def agreed_signal(self, signum: int | None) -> int:
        """The stop signal any rank received (0: none), the same on every rank."""
        flag = torch.tensor([float(signum or 0)], dtype=torch.float64)
        return int(self._reduced(flag, torch_dist.ReduceOp.MAX).item())

    def _reduced(self, values: torch.Tensor, op) -> torch.Tensor:
        if self.dist.world_size == 1:
            return values
        on_device = values.to(self.device if self.device.type == "cuda" else "cpu")
        torch_dist.all_reduce(on_device, op=op)
        return on_device.cpu()


ONE_PROCESS = Ranks()


@dataclass
class TrainingJob:
    """What a command gives the loop: its model, how a step is made, how it is scored and saved."""

    config: Config  # train.* (out, steps, tasks_per_batch, val_every, log_every) is read here
    model: torch.nn.Module  # put in training mode before each step (the DDP wrapper if any)
    optimizer: torch.optim.Optimizer | None  # None: a head without parameters, nothing to train
    micro_batches: int  # forward passes per step on this rank
    # The next micro-batch's forward + backward (loss scaled for the step); float64 [3]:
    # loss * episodes, correct queries, queries.
    micro_batch: Callable[[], torch.Tensor]
    validate: Callable[[], Any]  # a result with .accuracy and .ci95; may raise NonFiniteScores
    state_dicts: Callable[[], dict[str, Any]]  # checkpoint entries: weights, optimizer, RNG
    record: dict[str, Any]  # the run record (see run_record of each command)
    lower: str  # the settings a divergence message suggests lowering
    device: torch.device
    desc: str  # of the progress bar
    check_inputs: str = ""  # appended to the advice of a non-finite loss
    ranks: Ranks = ONE_PROCESS


@dataclass
class RunState:
    step: int = 0
    best_step: int = -1
    best_accuracy: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0
    saved_step: int | None = None  # the step last.pt holds (None: not written by this run yet)

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> RunState:
        """The state a run resumes with from its last.pt."""
        return cls(
            step=payload["step"],
            best_step=payload["best_step"],
            best_accuracy=payload["best_accuracy"],
            history=list(payload["history"]),
            resumed_from=payload["step"],
            saved_step=payload["step"],
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


def train_shape(config: Config) -> EpisodeShape:
    ep, pr = config.episodes, config.protocol
    return EpisodeShape(ep.way, pr.train_shot or ep.shot, pr.train_query)


def train_sampler(source, config: Config) -> EpisodeSampler:
    """Training episodes over a bank or a video split (checked once, naming the settings)."""
    names = ("episodes.way", "protocol.train_shot (default episodes.shot)", "protocol.train_query")
    return EpisodeSampler(source, train_shape(config), names)


def selection_episodes(source, config: Config) -> EpisodeIndex:
    """The fixed validation episodes (test shape, ``train.val_episodes``, ``eval.seed``)."""
    ep = config.episodes
    shape = EpisodeShape(ep.way, ep.shot, ep.query)
    return fixed_episodes(source, shape, config.train.val_episodes, config.eval.seed)


def run_record(
    config: Config,
    feature_dim: int,
    layer_dims: dict[str, int],
    train,
    select: EpisodeIndex,
    store: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """What a checkpoint and a report say about where the numbers came from.

    train: the training bank or video split; store: the command's account of the features it
    trains on (path, fingerprint, dataset, variant, encoder, frames, seq_len); extra: keys of the
    command's own.
    """
    return {
        **extra,
        "config": to_dict(config),
        "config_version": CONFIG_VERSION,
        "protocol": to_dict(config.protocol),
        "head_name": config.head.name,
        "feature_dim": feature_dim,
        "layer_dims": layer_dims,
        "num_train_classes": int(torch.unique(train.class_ids).numel()),
        "store": {**store, "train_videos": len(train), "train_videos_skipped": train.skipped},
        "selection": {
            "split": config.protocol.selection_split,
            "episodes": len(select),
            "episodes_sha256": select.digest(),
        },
    }


def open_run(
    out: Path,
    resume: bool,
    record: dict[str, Any],
    compared: tuple[str, ...],
    restore: Callable[[dict[str, Any]], None],
    ranks: Ranks = ONE_PROCESS,
) -> RunState:
    """A fresh state, or the state of ``out/last.pt`` with ``restore`` given its payload.

    Rank 0 first removes what killed writes left and repairs ``best.pt`` if a kill came between
    the two checkpoint writes; a run written with other settings is refused (``check_resumable``
    names each differing key). Then rank 0 writes the run record to ``config.json``.
    """
    if not resume and out.exists() and any(out.glob("*.pt")):
        raise ConfigError(
            f"{out} already holds checkpoints: pick a new --out or set train.resume=true"
        )
    payload = None
    if ranks.writer:
        clean_stray_files(out)
        payload = reconcile(out) if resume else None
    ranks.barrier()  # the other ranks read the last.pt that rank 0 made agree with best.pt
    if resume and not ranks.writer:
        payload = read_last(out)
    state = RunState()
    if payload is not None:
        check_resumable(out / "last.pt", payload, record, compared)
        state = RunState.from_checkpoint(payload)
        restore(payload)
    if ranks.writer:
        out.mkdir(parents=True, exist_ok=True)
        MetricLogger.drop_after(out, state.step)  # lines a killed run wrote past its last.pt
        write_atomic(out / "config.json", (json.dumps(record, indent=2) + "\n").encode())
    ranks.barrier()
    return state


def run_steps(job: TrainingJob, state: RunState, progress: bool = True) -> TrainResult:
    """Train from ``state`` to ``train.steps`` (see the module docstring)."""
    tr, ranks, device = job.config.train, job.ranks, job.device
    out = Path(tr.out)
    steps = tr.steps if job.optimizer is not None else 0
    optimizer = job.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer else []
    logger = MetricLogger(out, enabled=ranks.writer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started, episodes_done = time.perf_counter(), 0
    show = progress and ranks.writer and steps > 0
    bar = tqdm(total=steps, initial=state.step, unit="step", desc=job.desc, disable=not show)
    with stop_on_signals() as stop, bar:
        while state.step < steps:
            job.model.train()
            optimizer.zero_grad(set_to_none=True)
            totals = torch.zeros(3, dtype=torch.float64)  # loss * episodes, correct, queries
            for micro in range(job.micro_batches):
                last = micro == job.micro_batches - 1
                with nullcontext() if last else ranks.no_sync():
                    totals += job.micro_batch()
            # every rank sees the same sum, so all of them stop here together
            totals = ranks.summed(totals)
            if not bool(torch.isfinite(totals[0])):
                raise TrainingDiverged(
                    f"loss is {float(totals[0])} at step {state.step + 1}; stopped, nothing of "
                    f"it was written. Kept: {kept_files(out)} (lower {job.lower}"
                    f"{job.check_inputs})"
                )
            optimizer.step()
            check_parameters(params, state.step + 1, job.lower, out)
            state.step += 1
            episodes_done += tr.tasks_per_batch
            rate = episodes_done / max(time.perf_counter() - started, 1e-9)
            metrics = {
                "step": state.step,
                "loss": float(totals[0] / tr.tasks_per_batch),
                "train_accuracy": float(100.0 * totals[1] / totals[2]),
                "episodes_per_s": rate,
            }
            if device.type == "cuda":
                metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                acc=f"{metrics['train_accuracy']:.1f}",
                eps=f"{rate:.2f}",
            )
            if state.step % tr.log_every == 0 and ranks.writer:
                logger.log("train", metrics)
            if state.step % tr.val_every == 0 or state.step == steps:
                if ranks.writer:
                    validate_and_save(job, state, logger)
                ranks.barrier()
            signum = ranks.agreed_signal(stop.signum)
            if signum:  # the safe point: the step is done, its state goes to last.pt
                if state.saved_step != state.step:
                    save(job, state, improved=False)
                ranks.barrier()
                raise Interrupted(signum, f"kept: {kept_files(out)}")
    if steps == 0 and ranks.writer and not (out / "best.pt").exists():  # score it once
        validate_and_save(job, state, logger)
    logger.close()
    return TrainResult(
        out, state.step, state.best_step, state.best_accuracy, state.history,
        state.resumed_from, ranks.dist.world_size, ranks.dist.rank,
    )  # fmt: skip


def micro_totals(output, query_labels: torch.Tensor, loss: torch.Tensor, episodes: int):
    """What a micro-batch returns: float64 [3] (loss * episodes, correct queries, queries)."""
    correct = (output.logits.argmax(-1) == query_labels).sum()
    return torch.tensor(
        [loss.item() * episodes, float(correct), float(query_labels.numel())], dtype=torch.float64
    )


def check_parameters(params, step: int, lower: str, out: Path) -> None:
    """Stop before a diverged state can be validated or saved."""
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise TrainingDiverged(
            f"parameters became NaN or inf at step {step}; stopped, nothing of it was written. "
            f"Kept: {kept_files(out)} (lower {lower})"
        )


def validate_and_save(job: TrainingJob, state: RunState, logger: MetricLogger) -> None:
    """Score the selection episodes; last.pt, and best.pt when the score improved."""
    try:
        result = job.validate()
    except NonFiniteScores as err:
        raise TrainingDiverged(
            f"{err} at step {state.step}; stopped, nothing of it was written. Kept: "
            f"{kept_files(Path(job.config.train.out))} (lower {job.lower})"
        ) from err
    improved = state.record_validation(result, job.config.protocol.selection_split, logger)
    save(job, state, improved)


def save(job: TrainingJob, state: RunState, improved: bool) -> None:
    """The checkpoints of the current step (rank 0 writes them)."""
    if job.ranks.writer:
        payload = {
            **job.state_dicts(),
            "step": state.step,
            "best_step": state.best_step,
            "best_accuracy": state.best_accuracy,
            "history": list(state.history),
            **job.record,
        }
        save_run_checkpoints(Path(job.config.train.out), payload, improved)
    state.saved_step = state.step


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
