"""Running a list of jobs: one after another in this process, or ``jobs`` at a time in worker
processes of joblib's loky backend; a shard of them; stopping them all on SIGINT / SIGTERM.

Both ways call ``fsar.pipelines.jobs.run_job`` with the same thread count, so they give the same
bits. The loky executor is used directly rather than through ``joblib.Parallel`` because a stop
must keep it from starting further jobs (Parallel dispatches the next task as one finishes) and
the running ones must be told to stop at their next training step.

On a signal, or when a job fails, the parent stops handing out jobs and sends SIGTERM to its
workers every POLL_S until they answer: each stops training at its next step with ``last.pt``
written there (a worker between two jobs ignores the signal), and a rerun resumes it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fsar.config import RunsConfig, parse_shard
from fsar.errors import FsarError
from fsar.interrupts import Interrupted, stop_on_signals
from fsar.pipelines.jobs import Job, JobReport, make_plan, pending, run_job, write_plan

POLL_S = 0.1  # how often the parent looks at its workers and at a stop request


class JobFailed(FsarError, RuntimeError):
    """A job of the set failed; the message names it and the reason."""


@dataclass(frozen=True)
class Schedule:
    jobs: int = 1
    shard: tuple[int, int] = (0, 1)
    threads: int = 1
    devices: tuple[str, ...] = ()

    @classmethod
    def of(cls, runs: RunsConfig) -> Schedule:
        return cls(runs.jobs, parse_shard(runs.shard), runs.threads, tuple(runs.devices))


def my_share(jobs: list[Job], shard: tuple[int, int]) -> list[Job]:
    """Share I of N: jobs I, I+N, I+2N, ... (round robin, so each share mixes the points)."""
    index, count = shard
    return jobs[index::count]


def slot_devices(schedule: Schedule, job: Job) -> list[str | None]:
    """The device of each job slot: the listed ones in turn; every GPU when the job's device is
    auto and there are several; else the job's own (None)."""
    if schedule.devices:
        return list(schedule.devices)
    gpus = torch.cuda.device_count() if job.config.train.device == "auto" else 0
    return [f"cuda:{i}" for i in range(gpus)] if gpus > 1 else [None]


def run_jobs(
    jobs: list[Job], schedule: Schedule, label: str, progress: bool = True
) -> list[JobReport]:
    """Run every job (all finished, or an exception: ``Interrupted`` after a signal with the
    running jobs stopped at a step, ``JobFailed`` naming a failed job)."""
    if not jobs:
        return []
    devices = slot_devices(schedule, jobs[0])
    if schedule.jobs == 1 or len(jobs) == 1:
        return _run_here(jobs, schedule, devices, label, progress)
    return _run_in_workers(jobs, schedule, devices, label, progress)


def run_plan(
    command: str,
    jobs: list[Job],
    info: dict[str, Any],
    schedule: Schedule,
    out: Path,
    progress: bool = True,
) -> bool:
    """Write ``out/plan.json`` for ``jobs`` and run this shard's unfinished ones (runs whose
    results match the plan are skipped); True once every job of the plan, on every shard, has
    its result."""
    mine = my_share(jobs, schedule.shard)
    plan = make_plan(command, jobs, info, local=mine)
    write_plan(out, plan)
    todo, finished = pending(out, plan, mine)
    if finished and progress:
        print(f"{command}: {finished} run(s) already finished in {out}: skipped")
    run_jobs(todo, schedule, command, progress)
    return not pending(out, plan, jobs)[0]


def _run_here(jobs, schedule: Schedule, devices, label: str, progress: bool) -> list[JobReport]:
    reports: list[JobReport] = []
    with stop_on_signals() as stop:  # between jobs; run_job has its own while a job runs
        for job in jobs:
            stop.check(_summary(reports, jobs))
            if progress:
                print(f"{label}: {job.name}", flush=True)
            report = run_job(job, schedule.threads, devices[0], progress)
            reports.append(report)
            _announce(report, label, print)
            _raise_failure(reports, label)
            if report.signum is not None:
                raise Interrupted(report.signum, _summary(reports, jobs))
    return reports


def _run_in_workers(
    jobs, schedule: Schedule, devices, label: str, progress: bool
) -> list[JobReport]:
    from joblib.externals.loky import ProcessPoolExecutor

    threads = str(schedule.threads)  # also for OpenMP / MKL pools started before torch's call
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    workers = min(schedule.jobs, len(jobs))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if progress and cores and workers * schedule.threads > cores:
        print(
            f"{label}: note: {workers} jobs x {schedule.threads} thread(s) on {cores} cores: the "
            "runs compete for cores (same numbers, more time)"
        )
    others = {p.pid for p in multiprocessing.active_children()}
    queue, running, free = list(jobs), {}, list(range(workers))
    reports: list[JobReport] = []
    bar = tqdm(total=len(jobs), unit="run", desc=f"{label} ({workers} at a time)",
               disable=not progress)  # fmt: skip
    executor = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_signals, env=env)
    try:
        with stop_on_signals() as stop, bar:
            while True:
                stopping = stop.requested or any(r.status == "failed" for r in reports)
                if not running and (stopping or not queue):
                    break
                while queue and free and not stopping:
                    slot = free.pop(0)
                    device = devices[slot % len(devices)]
                    future = executor.submit(run_job, queue.pop(0), schedule.threads, device, False)
                    running[future] = slot
                done, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    free.append(running.pop(future))
                    try:
                        report = future.result()
                    except BrokenProcessPool:
                        if not stopping:
                            raise
                        continue  # killed while stopping: its files are whole, a rerun resumes
                    reports.append(report)
                    if report.signum is not None and not stop.requested:
                        stop.signum = report.signum  # the signal reached the workers only
                    _announce(report, label, tqdm.write)
                    bar.update(1)
                if (stopping or stop.requested) and running:  # a stop may come in the wait
                    # again at every poll: a job still being handed over ignores it
                    _signal_workers(others)
            signum = stop.signum
    except BrokenProcessPool as err:
        executor.shutdown(wait=True, kill_workers=True)
        raise JobFailed(
            f"a {label} worker process died ({err}); rerun the same command to resume (out of "
            "memory? try fewer --jobs)"
        ) from err
    except BaseException:  # a second Ctrl-C, a bug: no job is waited for
        executor.shutdown(wait=True, kill_workers=True)
        raise
    executor.shutdown(wait=True)  # every worker is idle here
    _raise_failure(reports, label)
    if signum is not None:
        raise Interrupted(signum, _summary(reports, jobs))
    return reports


def _ignore_signals() -> None:
    """A worker between jobs ignores SIGINT / SIGTERM (a job installs its own handlers); the
    parent decides when the set stops, and a terminal's Ctrl-C reaches the workers too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _signal_workers(others: set[int]) -> None:
    """SIGTERM to this process's worker processes (not to children it had before)."""
    for child in multiprocessing.active_children():
        if child.pid is not None and child.pid not in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)


def _announce(report: JobReport, label: str, write: Callable[[str], object]) -> None:
    if report.status == "done":
        resumed = f", resumed at step {report.resumed_from}" if report.resumed_from else ""
        write(
            f"{label}: {report.name} done: {report.accuracy:.2f}% ({report.seconds:.1f} s{resumed})"
        )
    elif report.status == "interrupted":
        write(f"{label}: {report.name} stopped: {report.message}")
    # a failure is raised as JobFailed once the running jobs have stopped


def _raise_failure(reports: list[JobReport], label: str) -> None:
    failed = [r for r in reports if r.status == "failed"]
    if failed:
        raise JobFailed(f"{label} run {failed[0].name} failed: {failed[0].message}")


def _summary(reports: list[JobReport], jobs: list[Job]) -> str:
    done = sum(r.status == "done" for r in reports)
    stopped = [r.name for r in reports if r.status == "interrupted"]
    text = f"{done} of {len(jobs)} runs of this command finished"
    return text + (f"; stopped at a step: {', '.join(stopped)}" if stopped else "")
