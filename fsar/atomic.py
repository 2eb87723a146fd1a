"""The one way fsar writes a single file: to a temporary name beside it, then rename.

A reader (or a rerun after a kill) sees the old file or the new one, never half of one. The
temporary file is ``<name>.<random>.partial`` in the same folder (a rename is only atomic within
one file system); a kill can leave one behind, and ``clean_partial`` removes them on the next run.
Chunked stores have their own writer (``fsar.cache.backends``): a chunk is not a user's file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

PARTIAL_SUFFIX = ".partial"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a published file gets the mode open() would give it
FILE_MODE = 0o666 & ~_read_umask()


def make_parents(path: str | Path) -> None:
    """Create the folders above ``path``. A file where a folder must be is reported as
    "Not a directory" naming that file (``mkdir`` would say "File exists")."""
    parent = Path(path).parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
            break
    parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; on success it is fsynced and renamed over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    make_parents(path)
    handle, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"newline": ""})) as file:
            yield file
            file.flush()
            os.fchmod(file.fileno(), FILE_MODE)
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    with atomic_file(path) as file:
        file.write(data.encode() if isinstance(data, str) else data)


def clean_partial(folder: str | Path, name_glob: str = "*") -> list[Path]:
    """Remove the temporary files of writes a kill cut short (of files matching ``name_glob``)."""
    removed = sorted(Path(folder).glob(f"{name_glob}.*{PARTIAL_SUFFIX}"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it must not undo it)."""
    try:
        directory = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename still happened
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)
