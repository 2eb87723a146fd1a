"""Zarr -> HDF5 export, written by a child process and published by one rename.

HDF5 does not survive a failed write: after a full disk its handles can neither flush nor
close, and freeing them crashes the process later (a segfault at exit, after the error was
reported). So the HDF5 file is written by a short-lived child process (``_child_main``) that
reports how it ended as one JSON line and leaves with ``os._exit``. This process only publishes
a complete file or removes the temporary one, and turns the child's failure into one line
(``StoreWriteError`` naming the file and "No space left on device" when the disk is full).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import fsar
from fsar.cache import store as store_module
from fsar.cache.backends import (
    Hdf5Backend,
    StoreReadError,
    publish,
    staging_path,
    write_error,
)
from fsar.cache.layout import STATUS_PENDING, array_specs
from fsar.cache.store import FeatureStore, _remove, open_store
from fsar.errors import FsarError

POLL_SECONDS = 0.05  # how often the parent looks for a stop request while the child writes


def export_hdf5(
    src: FeatureStore,
    dest: Path,
    *,
    overwrite: bool = False,
    allow_pending: bool = False,
    check: Callable[[], None] | None = None,
) -> None:
    """Copy ``src`` into an HDF5 file with identical layout and attributes.

    Written to a hidden temporary file next to ``dest`` and renamed into place at the end, so
    ``dest`` is either absent/old or complete. Refuses a source with pending videos unless
    allow_pending, and an existing ``dest`` unless overwrite. ``check`` is called while the
    copy runs (e.g. to stop on a signal); whatever it raises stops the copy and removes the
    temporary file. A write that fails (full disk, permissions) raises StoreWriteError.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True or choose another path")
    n_pending = int(np.sum(src.status == STATUS_PENDING))
    if n_pending and not allow_pending:
        raise ValueError(
            f"{src.path} still has {n_pending} pending videos; finish extraction "
            f"first or pass allow_pending=True"
        )
    staged = staging_path(dest)
    try:
        outcome = run_export_child(src.path, staged, store_module.READ_BYTES, check)
        if "errno" in outcome:
            error = OSError(outcome["errno"], outcome["reason"], outcome["file"] or str(staged))
            raise write_error(staged, error, f"exporting {src.path} to {dest} failed")
        if "read_error" in outcome:
            raise StoreReadError(outcome["read_error"])
        if "error" in outcome:
            raise RuntimeError(f"exporting {src.path} to {dest} failed: {outcome['error']}")
        publish(staged, dest, overwrite=overwrite)
    except BaseException:
        _remove(staged)
        raise


def run_export_child(
    src: Path, staged: Path, read_bytes: int, check: Callable[[], None] | None
) -> dict:
    """Run the HDF5 writer in a child process; its outcome as a dict (see ``_outcome``)."""
    package_root = str(Path(fsar.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p
    )}  # fmt: skip
    entry = "import sys; from fsar.cache.export import _child_main; _child_main(*sys.argv[1:])"
    command = [sys.executable, "-c", entry, str(src), str(staged), str(read_bytes)]
    with tempfile.TemporaryFile() as errors:
        # its own session: a Ctrl-C in the terminal reaches this process, which decides
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=env,
                                 start_new_session=True)  # fmt: skip
        try:
            while child.poll() is None:
                if check is not None:
                    check()
                time.sleep(POLL_SECONDS)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        lines = child.stdout.read().decode().strip().splitlines()
        child.stdout.close()
        if lines:
            return json.loads(lines[-1])
        errors.seek(0)
        tail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
    return {"error": f"the writer process ended with code {child.returncode} ({' '.join(tail)})"}


def write_hdf5_copy(src: FeatureStore, staged: Path) -> None:
    """Write every array and attribute of ``src`` into a new HDF5 file at ``staged``."""
    out = Hdf5Backend.build(staged, array_specs(src.layout), src.attrs)
    try:
        for spec in array_specs(src.layout):
            if spec.name.startswith("classes/"):
                out.write(spec.name, 0, src._arrays.read(spec.name))
                continue
            if not src._arrays.has(spec.name):  # an older store: the fill value stands
                continue
            for start, stop in store_module._spans(src.layout):
                out.write(spec.name, start, src._arrays.read(spec.name, slice(start, stop)))
        out.close()  # flushes: a full disk shows here too, before anything is published
    except BaseException:
        out.abandon()
        raise


def _outcome(err: BaseException | None) -> dict:
    """{} when the copy succeeded; else errno/reason/file of a failed write, read_error for a
    damaged source, or error (anything else)."""
    if err is None:
        return {}
    if isinstance(err, StoreReadError):
        return {"read_error": str(err)}
    text = str(err)
    if isinstance(err, OSError) and err.errno is not None and not isinstance(err, FsarError):
        return {"errno": err.errno, "reason": err.strerror or text, "file": err.filename}
    found = re.search(r"errno = (\d+), error message = '([^']*)'", text)  # HDF5's own words
    if found:
        file = re.search(r"filename = '([^']*)'", text)
        return {"errno": int(found.group(1)), "reason": found.group(2),
                "file": file.group(1) if file else None}  # fmt: skip
    return {"error": f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"}


def _child_main(src: str, staged: str, read_bytes: str) -> None:
    store_module.READ_BYTES = int(read_bytes)
    error: BaseException | None = None
    try:
        write_hdf5_copy(open_store(Path(src)), Path(staged))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        error = err
    sys.stdout.write(json.dumps(_outcome(error)) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip freeing HDF5 handles: after a failed write that can crash
