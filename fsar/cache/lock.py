"""One writer per store: a lock file beside the store names the process writing it.

Two ``fsar extract`` runs on the same ``--out`` would both encode every pending block (Zarr) or
trip over each other's staging files (HDF5). The writer holds ``<out>.lock`` with ``flock``:
the kernel drops the lock when the process dies (even by SIGKILL), so a lock left behind by a
killed run is taken over without any guessing about process ids, while the file's JSON names
the live holder for the refusal message. Ranks of one ``torchrun`` job share a store: only rank
0 takes the lock. (Locks on network file systems depend on their lock service; NFSv4 and
Lustre with ``flock`` mounts honour it.)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fsar.atomic import make_parents
from fsar.errors import FsarError


class StoreLockedError(FsarError, RuntimeError):
    """Another process is writing the same store."""


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def _holder(path: Path) -> str:
    try:
        owner = json.loads(path.read_text())
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def acquire(out: Path) -> int:
    """Take the lock of ``out``; returns the open descriptor that holds it."""
    path = lock_path(out)
    make_parents(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{out} is being written by another fsar extract ({_holder(path)}; lock file "
                f"{path}): wait for it to finish, or stop it and rerun; one store takes one "
                "writer (ranks of one torchrun job share it)"
            ) from None
        try:  # the previous holder may have removed the file between our open and our flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(owner).encode())
    return fd


def release(out: Path, fd: int) -> None:
    """Remove the lock file, then drop the lock (in that order: no one locks a removed file)."""
    try:
        lock_path(out).unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """Hold the lock of ``out`` for the block; raises StoreLockedError when another holds it."""
    fd = acquire(out)
    try:
        yield
    finally:
        release(out, fd)


def remove_leftovers(out: Path) -> list[Path]:
    """Delete temporary files of killed writers of ``out``; call only while holding its lock.

    These are hidden staging copies beside it (``.<name>.<id>.tmp``: a store being created or an
    HDF5 file being exported) and half-written chunk files inside a Zarr store (``*.partial``).
    """
    removed = sorted(out.parent.glob(f".{out.name}.*.tmp"))
    if out.is_dir():
        removed += sorted(out.rglob(".*.partial"))
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
