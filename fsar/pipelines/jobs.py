"""One training run of an ablation or a sweep (a *job*), its result file and the plan of a set.

``run_job`` trains a job (or resumes it from its ``last.pt``), scores it and writes ``job.json``
atomically; every path that runs jobs (one after another, in parallel, one shard of them) calls
it. ``plan.json`` lists the jobs of an ablation or a sweep with what makes each one that job
(its settings and stores); every table is built from the plan and the jobs' ``job.json`` files
alone (``read_results``), so a table collected from shards run on several machines is the one a
single machine writes, and a rerun skips the jobs whose ``job.json`` matches the plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fsar.atomic import write_atomic
from fsar.config import AblateConfig, Config, to_dict
from fsar.devices import resolve_device
from fsar.errors import FsarError
from fsar.failures import describe_error
from fsar.interrupts import Interrupted, stop_on_signals
from fsar.pipelines.run_checkpoints import flatten

JOB_FILE = "job.json"
JOB_KIND = "fsar-job/1"
PLAN_FILE = "plan.json"
PLAN_KIND = "fsar-plan/1"
# Where a job's files go and what computes them: not what the job is. Stores are compared by
# their fingerprints instead of their paths (a shard's node may hold its copy elsewhere).
FREE_SETTINGS = frozenset(
    {
        "train.out",
        "eval.out",
        "train.store",
        "eval.store",
        "train.device",
        "eval.device",
        "train.resume",
        "train.log_every",
    }
)


class JobsError(FsarError, ValueError):
    """A set of jobs cannot be run or collected as asked; the message says what to do."""


@dataclass
class Job:
    name: str  # its folder under the set's out, e.g. "padm=false/seed=6"
    group: str  # the table row / report cell it counts towards; its seeds are averaged
    labels: dict[str, Any]  # what the group is, e.g. {"head.padm": False}
    seed: int
    config: Config  # train.out and eval.out point into the job's folder


@dataclass
class JobReport:
    """What ``run_job`` did (the numbers are in ``job.json``)."""

    name: str
    status: Literal["done", "interrupted", "failed"]
    message: str = ""
    signum: int | None = None  # a signal arrived while the job ran (it may still be done)
    accuracy: float | None = None
    resumed_from: int = 0
    seconds: float = 0.0


def job_config(config: Config, overrides: dict[str, Any], out: Path) -> Config:
    """A job's settings: ``config`` with ``overrides`` and the job's folder ``out``; the set's own
    section (``ablate``) is dropped, so the job records only what trains and scores it."""
    from fsar.config import with_overrides

    job = with_overrides(
        config, {**overrides, "train.out": str(out), "eval.out": str(out / "eval.json")}
    )
    return dataclasses.replace(job, ablate=AblateConfig())


def job_settings(config: Config) -> dict[str, Any]:
    """The dotted settings that make a job what it is (JSON values, as job.json holds them)."""
    flat = flatten(json.loads(json.dumps(to_dict(config))))
    return {
        key: value
        for key, value in flat.items()
        if key not in FREE_SETTINGS and not key.startswith("ablate.")
    }


def store_fingerprints(config: Config, cache: dict[str, str]) -> dict[str, str]:
    """Fingerprints of the stores a job trains and is scored on (``cache``: path -> print)."""
    from fsar.cache import open_store

    paths = {"train": config.train.store, "eval": config.eval.store or config.train.store}
    found = {}
    for role, path in paths.items():
        if not path:
            raise JobsError(f"{role} store of {config.train.out} is not set: pass --store STORE")
        if path not in cache:
            cache[path] = open_store(Path(path)).fingerprint
        found[role] = cache[path]
    return found


def job_identity(job: Job, cache: dict[str, str] | None) -> dict[str, Any]:
    """What a finished job's ``job.json`` must match to stand for ``job``: its settings, and its
    stores' fingerprints unless ``cache`` is None (the stores are not on this machine)."""
    stores = store_fingerprints(job.config, cache) if cache is not None else None
    return {"settings": job_settings(job.config), "stores": stores}


def run_job(job: Job, threads: int, device: str | None, progress: bool) -> JobReport:
    """Train ``job`` (resuming its ``last.pt``), score ``best.pt``, write ``job.json``.

    Runs with ``threads`` CPU threads (restored after) on ``device`` (None: the job's own).
    SIGINT / SIGTERM stop training at the next step (``last.pt`` written there) and skip the
    evaluation; a signal during the evaluation lets it finish. Expected failures (``FsarError``,
    ``OSError``) come back as a ``failed`` report rather than an exception: a worker process
    returns them to the parent whole.
    """
    from fsar.pipelines.run_eval import run_evaluation
    from fsar.pipelines.train import train_heads

    started = time.perf_counter()
    config = job.config
    if device is not None:
        config = dataclasses.replace(
            config,
            train=dataclasses.replace(config.train, device=device),
            eval=dataclasses.replace(config.eval, device=device),
        )
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with stop_on_signals() as stop:
            trained = train_heads(config, progress=progress)
            # a signal before training installed its handler, or after its last step
            stop.check("trained, not yet evaluated")
            result, outcome = run_evaluation(
                config, checkpoint=str(trained.out / "best.pt"), progress=progress
            )
            record = {
                "kind": JOB_KIND,
                "name": job.name,
                "group": job.group,
                "labels": job.labels,
                "seed": job.seed,
                "settings": job_settings(config),
                "stores": {
                    "train": _fingerprint(trained.out),
                    "eval": result["store"]["fingerprint"],
                },
                "threads": threads,
                "device": str(resolve_device(config.train.device)),
                "train": {
                    "steps": trained.steps,
                    "best_step": trained.best_step,
                    "best_accuracy": _finite(trained.best_accuracy),
                    "resumed_from": trained.resumed_from,
                },
                "seconds": time.perf_counter() - started,
                "result": result,
                "per_episode": outcome.per_episode.tolist(),
            }
            write_atomic(trained.out / JOB_FILE, json.dumps(record, indent=1) + "\n")
            return JobReport(
                job.name,
                "done",
                signum=stop.signum,
                accuracy=result["accuracy"],
                resumed_from=trained.resumed_from,
                seconds=record["seconds"],
            )
    except Interrupted as err:
        return JobReport(job.name, "interrupted", str(err), err.signum)
    except (FsarError, OSError) as err:
        return JobReport(job.name, "failed", describe_error(err))
    finally:
        torch.set_num_threads(previous)


def _fingerprint(run: Path) -> str:
    """The training store's fingerprint as the run recorded it (config.json of fsar train)."""
    return json.loads((run / "config.json").read_text())["store"]["fingerprint"]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_job(path: Path) -> dict[str, Any] | None:
    """A ``job.json`` (None when there is none); a torn or foreign file is an error."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise JobsError(f"{path}: not a valid job result ({err}); delete it to rerun") from err
    if not isinstance(record, dict) or record.get("kind") != JOB_KIND:
        raise JobsError(f"{path}: not an fsar job result (need kind {JOB_KIND!r})")
    return record


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key old -> new`` for each setting or store where a job.json differs from the plan
    (stores only where the plan knows them)."""
    stores = wanted["stores"] is not None
    old, new = _identity_items(saved, stores), _identity_items(wanted, stores)
    unset = "<unset>"
    return [
        f"{key} {old.get(key, unset)!r} -> {new.get(key, unset)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, unset) != new.get(key, unset)
    ]


def _identity_items(identity: dict[str, Any], stores: bool) -> dict[str, Any]:
    prints = identity["stores"].items() if stores else ()
    return {**identity["settings"], **{f"{role} store fingerprint": fp for role, fp in prints}}


def matches(record: dict[str, Any] | None, identity: dict[str, Any]) -> bool:
    return record is not None and not differences(record, identity)


# -- plans -------------------------------------------------------------------------------------


def make_plan(
    command: str, jobs: list[Job], info: dict[str, Any], local: list[Job] | None = None
) -> dict[str, Any]:
    """The jobs of a set (in table order) and what each one's ``job.json`` must match.

    Store fingerprints are read for the ``local`` jobs only (default: all), the ones this
    machine runs: a shard's node may hold only its own jobs' stores."""
    cache: dict[str, str] = {}
    here = {job.name for job in (jobs if local is None else local)}
    return {
        "kind": PLAN_KIND,
        "command": command,
        "info": info,
        "jobs": [
            {
                "name": job.name,
                "group": job.group,
                "labels": job.labels,
                "seed": job.seed,
                "identity": job_identity(job, cache if job.name in here else None),
            }
            for job in jobs
        ],
    }


def write_plan(out: Path, plan: dict[str, Any]) -> None:
    """``out/plan.json`` (every shard writes the same one)."""
    write_atomic(out / PLAN_FILE, json.dumps(plan, indent=1) + "\n")


def read_plan(out: Path, command: str) -> dict[str, Any]:
    path = out / PLAN_FILE
    if not path.is_file():
        raise JobsError(
            f"{out} holds no {PLAN_FILE}: collect the folder a `fsar {command}` run (or its "
            "shards) wrote into"
        )
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise JobsError(f"{path}: not a valid plan ({err})") from err
    if plan.get("kind") != PLAN_KIND or plan.get("command") != command:
        raise JobsError(f"{path}: not the plan of an fsar {command} (kind {plan.get('kind')!r})")
    return plan


def pending(out: Path, plan: dict[str, Any], jobs: list[Job]) -> tuple[list[Job], int]:
    """The ``jobs`` (of ``plan``) whose ``job.json`` does not match the plan, and how many do."""
    entries = {entry["name"]: entry for entry in plan["jobs"]}
    todo = [
        job
        for job in jobs
        if not matches(read_job(out / job.name / JOB_FILE), entries[job.name]["identity"])
    ]
    return todo, len(jobs) - len(todo)


def read_results(out: Path, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every job's ``job.json`` in plan order; a missing or mismatched one is an error."""
    records, missing = [], []
    for entry in plan["jobs"]:
        path = out / entry["name"] / JOB_FILE
        record = read_job(path)
        if record is None:
            missing.append(entry["name"])
            continue
        changed = differences(record, entry["identity"])
        if changed:
            raise JobsError(
                f"{path} was run with other settings than {out / PLAN_FILE} names "
                f"({'; '.join(changed[:3])}): rerun the command that holds it"
            )
        records.append(record)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise JobsError(
            f"{out}: {len(missing)} of {len(plan['jobs'])} runs have no result yet ({shown}): "
            "run the shards that hold them (or copy their folders in), then collect again"
        )
    return records
