"""The ``last.pt`` / ``best.pt`` pair of a training run: write order, repair, resume checks.

Used by ``fsar train`` and ``fsar finetune`` alike.

Write order. When a validation improves, the state of that step is both the last and the best
one, so ``last.pt`` is written first and ``best.pt`` second, each atomically. A kill (or a full
disk) between the two leaves ``last.pt`` naming its own step as best while ``best.pt`` still holds
the previous best: the best state is not lost (it is ``last.pt``), and ``reconcile`` copies it to
``best.pt`` when the run is resumed. Any other disagreement cannot come from an interruption and is
refused rather than guessed at.

Resume checks. A resumed run must be the run that wrote ``last.pt``: every setting that moves a
number (store, episodes, protocol, selection episodes, head, training) has to agree; settings of
speed, device and output may change, and ``train.steps`` may be raised (or lowered down to the
step already done).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from fsar.atomic import clean_partial
from fsar.config import ConfigError, upgrade_config_dict
from fsar.pipelines.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    NonFiniteWeights,
    load_checkpoint,
    save_checkpoint,
)

# What a resumed ``fsar train`` compares with the run record in last.pt (dotted prefixes).
TRAIN_COMPARED = (
    "config.head",
    "config.protocol",
    "config.episodes",
    "config.train",
    "config.eval.seed",
    "store.fingerprint",
    "selection",
)
# ``fsar finetune`` reads the videos and builds the encoder itself, so those settings count too.
FINETUNE_COMPARED = TRAIN_COMPARED[:-2] + (
    "config.dataset",
    "config.model",
    "config.extract",
    "config.finetune",
    "encoder",
    "store.variant",
    "store.train_videos",
    "store.train_videos_skipped",
    "selection",
)
# Settings that change neither a weight nor a score: where files go, the device, speed and memory
# knobs, what is printed. A resumed run may change them. ``train.steps`` is checked on its own.
FREE_KEYS = frozenset(
    {
        "config.train.out",
        "config.train.store",  # the store itself is compared by its fingerprint
        "config.train.device",
        "config.train.resume",
        "config.train.log_every",
        "config.train.compile",  # same numbers to float rounding (fsar.pipelines.compiled)
        "config.train.steps",
        "config.dataset.root",  # the videos themselves are compared by their counts and episodes
        "config.dataset.splits_dir",
        "config.dataset.splits",
        "config.extract.out",
        "config.extract.backend",
        "config.extract.workers",
        "config.extract.device",
        "config.extract.batch_frames",
        "config.extract.chunk_videos",
        "config.extract.retry_failed",
        "config.finetune.workers",
        "config.finetune.prefetch",
        "config.finetune.grad_checkpointing",
        "config.finetune.validation",  # cached and decoded validation give the same numbers
        "selection.validation",
    }
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def resume_conflicts(
    saved: dict[str, Any], current: dict[str, Any], compared: tuple[str, ...], step: int
) -> list[str]:
    """``key old -> new`` for every compared setting that differs between two run records.

    ``saved`` is the record in last.pt (which has reached ``step``), ``current`` this run's.
    """
    old, new = flatten(saved), flatten(current)
    missing = "<unset>"
    conflicts = []
    for key in sorted(set(old) | set(new)):
        if key in FREE_KEYS or not any(
            key == prefix or key.startswith(prefix + ".") for prefix in compared
        ):
            continue
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            conflicts.append(f"{key.removeprefix('config.')} {_show(before)} -> {_show(after)}")
    steps = new.get("config.train.steps")
    if isinstance(steps, int) and steps < step:
        conflicts.append(
            f"train.steps {old.get('config.train.steps')} -> {steps} (below the {step} steps "
            "last.pt holds)"
        )
    return conflicts


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 20 or not isinstance(value, str) else repr(value[:12] + "...")


def check_resumable(last: Path, payload: dict, record: dict, compared: tuple[str, ...]) -> None:
    """Refuse to continue ``last.pt`` under settings that would mix two runs."""
    if payload.get("regime") != record.get("regime"):
        command = "fsar finetune" if payload.get("regime") == "e2e" else "fsar train"
        raise ConfigError(f"cannot resume {last}: {command} wrote it; pick a new --out")
    saved = {
        **payload,
        "config": upgrade_config_dict(payload["config"], int(payload.get("config_version", 1))),
    }
    conflicts = resume_conflicts(saved, record, compared, int(payload["step"]))
    if conflicts:
        raise ConfigError(
            f"cannot resume {last}: it was written with other settings ({'; '.join(conflicts)}); "
            "rerun with its settings, or pick a new --out for a new run"
        )


def save_run_checkpoints(out: Path, payload: dict[str, Any], improved: bool) -> None:
    """``last.pt``, then ``best.pt`` when this step is the best (see the module docstring)."""
    try:
        save_checkpoint(out / "last.pt", payload)
        if improved:
            save_checkpoint(out / "best.pt", payload)
    except CheckpointWriteError as err:
        full = getattr(err.__cause__, "errno", None) == errno.ENOSPC
        raise CheckpointWriteError(
            f"{err}. Kept: {kept_files(out)}; {'free space' if full else 'fix that'} and rerun "
            "the same command to resume"
        ) from err
    except NonFiniteWeights as err:  # e.g. an optimizer state that overflowed
        raise NonFiniteWeights(f"{err}; stopped. Kept: {kept_files(out)}") from err


def held_step(path: Path) -> int | None:
    """The step a checkpoint file holds, or None when there is no such file."""
    if not path.exists():
        return None
    return int(load_checkpoint(path)["step"])


def clean_stray_files(out: Path) -> None:
    """Remove the temporary files of writes a kill cut short (checkpoints, metrics, config)."""
    clean_partial(out)  # checkpoints, metrics.jsonl, config.json: one atomic writer


def reconcile(out: Path) -> dict[str, Any] | None:
    """The payload of ``out/last.pt`` (None without one), with ``best.pt`` made to agree."""
    last, best = out / "last.pt", out / "best.pt"
    if not last.exists():
        if best.exists():
            raise CheckpointError(
                f"{best} exists without the last.pt of its run, so the run cannot be resumed "
                "exactly: pick a new --out (or move best.pt away)"
            )
        return None
    payload = load_checkpoint(last)
    claimed, step = int(payload["best_step"]), int(payload["step"])
    held = held_step(best)
    if held == claimed or (claimed < 0 and held is None):
        return payload
    if claimed == step:  # stopped between writing last.pt and best.pt: last.pt is the best
        save_checkpoint(best, payload)
        print(f"note: {best} repaired from {last} (step {step}, stopped between the two writes)")
        return payload
    raise CheckpointError(
        f"{last} names step {claimed} as best but {best} holds "
        f"{'nothing' if held is None else f'step {held}'}; an interruption cannot cause this, "
        "so the files were changed by hand: pick a new --out"
    )


def read_last(out: Path) -> dict[str, Any] | None:
    """The payload of ``out/last.pt`` as it is (after ``reconcile`` ran elsewhere)."""
    return load_checkpoint(out / "last.pt") if (out / "last.pt").exists() else None


def kept_files(out: Path) -> str:
    """A true statement of what a stopped run leaves, read back from the files themselves."""
    steps: dict[str, int | None] = {}
    best_named = None
    for name in ("last.pt", "best.pt"):
        try:
            payload = load_checkpoint(out / name) if (out / name).exists() else None
        except CheckpointError:
            steps[name] = -1
            continue
        steps[name] = None if payload is None else int(payload["step"])
        if name == "last.pt" and payload is not None:
            best_named = int(payload["best_step"])
    parts = [
        f"{name} {'is unreadable' if step == -1 else f'holds step {step}'}"
        for name, step in steps.items()
        if step is not None
    ]
    if not parts:
        return f"no checkpoint was written in {out}"
    text = f"{' and '.join(parts)} in {out}"
    if best_named is not None and best_named >= 0 and best_named != steps["best.pt"]:
        text += f" (rerunning copies the best step {best_named} from last.pt to best.pt)"
    return text
