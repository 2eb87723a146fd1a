"""Array access behind one small interface: a Zarr v3 directory or an HDF5 file.

Both backends hold the same named arrays (``videos/id``, ``features/center``, ...) and one dict
of JSON-able group attributes. Rows are always selected along the first (video) axis.

Crash safety (Zarr): every chunk file is written to a hidden temporary file in the same
directory, fsynced, then renamed over the chunk (``os.replace`` is atomic on POSIX), so a
process killed at any moment leaves each chunk either old or new, never truncated. Chunks are
also zstd-compressed with a content checksum, so a chunk damaged by other means fails loudly
on read instead of decoding to wrong numbers. HDF5 gives neither guarantee: write HDF5 from one
process, or stage in Zarr and convert with ``export_hdf5``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore

from fsar.atomic import make_parents
from fsar.cache.layout import ArraySpec
from fsar.errors import FsarError, StoreError

BACKENDS = ("zarr", "hdf5")
Rows = slice | np.ndarray | None  # None = all rows; an array must be sorted and unique
# Zarr skips writing a chunk equal to the fill value by default, so a deleted chunk could not be
# told from one never written; fsar writes every chunk it is given and treats a missing chunk
# of written rows as damage.
ZARR_CONFIG = {"write_empty_chunks": True}


class StoreReadError(FsarError, OSError):
    """A store (or one chunk of one array) cannot be read: truncated, corrupted or deleted."""


class StoreWriteError(FsarError, OSError):
    """Writing a store failed for a reason of the environment (disk full, permissions)."""


def verify_hint(path: Path) -> str:
    return f"run `fsar cache verify {path}` to list every problem"


def _rows_of(rows: Rows, n: int) -> np.ndarray:
    if rows is None:
        return np.arange(n)
    if isinstance(rows, slice):
        return np.arange(n)[rows]
    return np.asarray(rows, dtype=np.int64)


def _read_error(path: Path, what: str, err: Exception) -> StoreReadError:
    reason = f"{type(err).__name__}: {err}".replace("\n", " ")
    return StoreReadError(
        f"{path}: cannot read {what}: {reason}; the store is damaged: {verify_hint(path)}"
    )


def _read_located(backend, name: str, rows: Rows) -> np.ndarray:
    """``backend._raw_read``, with a damaged chunk's codec, checksum or I/O error turned into a
    ``StoreReadError`` naming the store, array and chunk; a wrong name or index stays a bug."""
    try:
        return backend._raw_read(name, rows)
    except (KeyError, IndexError, TypeError):
        raise
    except Exception as err:  # noqa: BLE001 - whatever the codec or h5py raises for damage
        raise _locate_read_error(backend, name, rows, err) from err


def _locate_read_error(backend, name: str, rows: Rows, err: Exception) -> Exception:
    """Read the requested rows chunk by chunk to name the first chunk that fails."""
    n, k = backend.shape(name)[0], backend.chunk_rows(name)
    for chunk in np.unique(_rows_of(rows, n) // k) if n else []:
        first, stop = int(chunk) * k, min(int(chunk + 1) * k, n)
        try:
            backend._raw_read(name, slice(first, stop))
        except Exception as inner:  # noqa: BLE001 - the chunk we are looking for
            unit = "rows" if name.startswith("classes/") else "videos"
            what = f"{name} chunk {int(chunk)} ({unit} {first}..{stop - 1})"
            return _read_error(backend.path, what, inner)
    return _read_error(backend.path, name, err)


def write_error(path: Path, err: OSError, what: str) -> StoreWriteError:
    """One line for an OSError while writing: the file, the reason, and that a rerun resumes."""
    where = err.filename or path
    reason = err.strerror or str(err).replace("\n", " ")
    error = StoreWriteError(
        f"{what}: {where}: {reason}; free space (or fix permissions) and rerun the same command "
        f"to resume"
    )
    error.errno = err.errno
    return error


class ArrayBackend(Protocol):
    """What the feature store needs from a storage format."""

    kind: str
    path: Path
    writable: bool

    def read(self, name: str, rows: Rows = None) -> np.ndarray: ...
    def write(self, name: str, start: int, value: np.ndarray) -> None: ...
    def write_many(self, items: list[tuple[str, int, np.ndarray]]) -> None: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> str: ...
    def has(self, name: str) -> bool: ...
    def chunk_rows(self, name: str) -> int: ...
    def missing_chunks(self, name: str, rows: Rows = None) -> list[tuple[int, int]]: ...
    def attrs(self) -> dict[str, Any]: ...
    def update_attrs(self, values: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def size_bytes(self) -> int: ...


def _durable_put(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename (all or nothing)."""
    make_parents(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a failed write() names no file: say which one
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class DurableLocalStore(LocalStore):
    """zarr's LocalStore with every key written through ``_durable_put``."""

    async def set(self, key: str, value: Any) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(_durable_put, self.root / key, value.to_bytes())

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        # only used for group metadata while a store is built in its private staging folder
        if not (self.root / key).exists():
            await self.set(key, value)

    def set_sync(self, key: str, value: Any) -> None:
        self._ensure_open_sync()
        self._check_writable()
        _durable_put(self.root / key, value.to_bytes())


def _as_str_array(value: Any) -> np.ndarray:
    return np.array([str(v) for v in np.asarray(value, dtype=object).ravel()], dtype=object)


class ZarrBackend:
    """A Zarr v3 group in a directory (one file per chunk)."""

    kind = "zarr"

    def __init__(self, path: Path, group: zarr.Group, writable: bool) -> None:
        self.path, self._group, self.writable = path, group, writable
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def open(cls, path: Path, writable: bool) -> ZarrBackend:
        store = DurableLocalStore(path, read_only=not writable)
        group = zarr.open_group(
            store, mode="r+" if writable else "r", zarr_format=3, use_consolidated=False
        )
        return cls(path, group, writable)

    @classmethod
    def build(cls, path: Path, specs: list[ArraySpec], attrs: dict[str, Any]) -> ZarrBackend:
        group = zarr.open_group(DurableLocalStore(path), mode="w-", zarr_format=3)
        for spec in specs:
            group.create_array(
                spec.name,
                shape=spec.shape,
                chunks=spec.chunks,
                dtype=str if spec.dtype == "str" else spec.dtype,
                fill_value=spec.fill,
                compressors=ZstdCodec(level=1, checksum=True),
                config=ZARR_CONFIG,
            )
        group.attrs.update(attrs)
        return cls(path, group, writable=True)

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self._group[name].with_config(ZARR_CONFIG)
        return self._arrays[name]

    def chunk_rows(self, name: str) -> int:
        return int(self._array(name).chunks[0])

    def missing_chunks(self, name: str, rows: Rows = None) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` of the chunks holding ``rows`` that have no file."""
        arr = self._array(name)
        n, k = arr.shape[0], arr.chunks[0]
        tail = (0,) * (arr.ndim - 1)
        missing = []
        for chunk in np.unique(_rows_of(rows, n) // k) if n else []:
            key = arr.metadata.encode_chunk_key((int(chunk), *tail))
            if not (self.path / name / key).is_file():
                missing.append((int(chunk) * k, min(int(chunk + 1) * k, n)))
        return missing

    def read(self, name: str, rows: Rows = None) -> np.ndarray:
        return _read_located(self, name, rows)

    def _raw_read(self, name: str, rows: Rows = None) -> np.ndarray:
        arr = self._array(name)
        if rows is None:
            out = arr[...]
        elif isinstance(rows, slice):
            out = arr[rows]
        else:
            out = arr.oindex[(np.asarray(rows, dtype=np.int64),)]
        out = np.asarray(out)
        return out.astype(object) if arr.dtype.kind not in "biuf" else out

    def write(self, name: str, start: int, value: np.ndarray) -> None:
        self.write_many([(name, start, value)])

    def write_many(self, items: list[tuple[str, int, np.ndarray]]) -> None:
        """Write rows ``start..`` of several arrays concurrently; returns when all are on disk."""
        jobs = []
        for name, start, value in items:
            arr = self._array(name).async_array
            if arr.dtype.kind not in "biuf":
                value = _as_str_array(value)
            jobs.append(arr.setitem(slice(start, start + len(value)), value))

        async def run() -> None:
            await asyncio.gather(*jobs)

        zarr_sync(run())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._array(name).shape)

    def dtype(self, name: str) -> str:
        dt = self._array(name).dtype
        return "str" if dt.kind not in "biuf" else dt.name

    def has(self, name: str) -> bool:
        try:
            return isinstance(self._group[name], zarr.Array)
        except KeyError:
            return False

    def attrs(self) -> dict[str, Any]:
        return json.loads(json.dumps(dict(self._group.attrs)))

    def update_attrs(self, values: dict[str, Any]) -> None:
        self._group.attrs.update(values)

    def flush(self) -> None:
        """Nothing to do: every chunk write is durable when ``write`` returns."""

    def close(self) -> None:
        self._arrays.clear()

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs ``[start, stop)`` of a sorted unique index array."""
    if len(rows) == 0:
        return []
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    firsts, lasts = np.r_[0, cut], np.r_[cut, len(rows)] - 1
    return [(int(rows[a]), int(rows[b]) + 1) for a, b in zip(firsts, lasts, strict=True)]


class Hdf5Backend:
    """An HDF5 file; attributes are stored as JSON text. Single writer, not crash-safe."""

    kind = "hdf5"

    def __init__(self, path: Path, file: h5py.File, writable: bool) -> None:
        self.path, self._file, self.writable = path, file, writable

    @classmethod
    def open(cls, path: Path, writable: bool) -> Hdf5Backend:
        try:
            return cls(path, h5py.File(path, "r+" if writable else "r"), writable)
        except OSError as err:  # truncated or damaged file
            raise _read_error(path, "the HDF5 file", err) from err

    @classmethod
    def build(cls, path: Path, specs: list[ArraySpec], attrs: dict[str, Any]) -> Hdf5Backend:
        backend = cls(path, h5py.File(path, "w-"), writable=True)
        try:
            backend._create(specs, attrs)
        except BaseException:
            backend.abandon()
            raise
        return backend

    def abandon(self) -> None:
        """Close a file being given up after a failed write (then delete it).

        On a full disk HDF5 cannot flush, so it cannot close, and its open handles crash the
        process when they are freed later. Emptying the file first gives its last metadata
        writes room, so it closes cleanly.
        """
        with contextlib.suppress(OSError):
            os.truncate(self.path, 0)
        with contextlib.suppress(Exception):  # already failing: the first error is the one to say
            self.close()

    def _create(self, specs: list[ArraySpec], attrs: dict[str, Any]) -> None:
        file = self._file
        for spec in specs:
            if spec.dtype == "str":
                file.create_dataset(
                    spec.name,
                    shape=spec.shape,
                    chunks=spec.chunks,
                    dtype=h5py.string_dtype("utf-8"),
                )
            else:
                file.create_dataset(
                    spec.name,
                    shape=spec.shape,
                    chunks=spec.chunks,
                    dtype=spec.dtype,
                    fillvalue=spec.fill,
                    fletcher32=True,  # a checksum per chunk: a damaged chunk fails to read
                )
        self.update_attrs(attrs)

    def chunk_rows(self, name: str) -> int:
        ds = self._file[name]
        return int(ds.chunks[0]) if ds.chunks else max(int(ds.shape[0]), 1)

    def missing_chunks(self, name: str, rows: Rows = None) -> list[tuple[int, int]]:
        """Always empty: chunks of one file cannot go missing one by one (damage fails reads)."""
        return []

    def read(self, name: str, rows: Rows = None) -> np.ndarray:
        return _read_located(self, name, rows)

    def _raw_read(self, name: str, rows: Rows = None) -> np.ndarray:
        ds = self._file[name]
        view = ds.asstr() if ds.dtype.kind == "O" else ds
        if rows is None or isinstance(rows, slice):
            out = view[rows if rows is not None else ...]
        else:
            parts = [view[a:b] for a, b in _runs(np.asarray(rows, dtype=np.int64))]
            out = np.concatenate(parts) if parts else view[0:0]
        return np.asarray(out, dtype=object) if ds.dtype.kind == "O" else np.asarray(out)

    def write(self, name: str, start: int, value: np.ndarray) -> None:
        ds = self._file[name]
        if ds.dtype.kind == "O":
            value = _as_str_array(value)
        ds[start : start + len(value)] = value

    def write_many(self, items: list[tuple[str, int, np.ndarray]]) -> None:
        for name, start, value in items:
            self.write(name, start, value)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file[name].shape)

    def dtype(self, name: str) -> str:
        dt = self._file[name].dtype
        return "str" if dt.kind == "O" else dt.name

    def has(self, name: str) -> bool:
        return isinstance(self._file.get(name), h5py.Dataset)

    def attrs(self) -> dict[str, Any]:
        return {key: json.loads(value) for key, value in self._file.attrs.items()}

    def update_attrs(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self._file.attrs[key] = json.dumps(value, ensure_ascii=False)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def size_bytes(self) -> int:
        return self.path.stat().st_size


def detect_backend(path: Path) -> str:
    """'zarr' for a directory holding zarr.json, 'hdf5' for an HDF5 file; else a clear error."""
    if path.is_dir():
        if (path / "zarr.json").is_file():
            return "zarr"
        raise StoreError(f"{path} is a directory but not a Zarr v3 store (no zarr.json)")
    if path.is_file():
        if h5py.is_hdf5(path):
            return "hdf5"
        raise StoreError(
            f"{path} is a file but not an HDF5 file; a feature store is a Zarr "
            f"directory or an .h5/.hdf5 file"
        )
    raise FileNotFoundError(f"no feature store at {path}")


def open_backend(path: Path, writable: bool) -> ArrayBackend:
    """Open an existing store, detecting its format."""
    kind = detect_backend(path)
    try:
        return (ZarrBackend if kind == "zarr" else Hdf5Backend).open(path, writable)
    except StoreReadError:  # already names the store and what to run
        raise
    except OSError as err:
        if err.filename is not None:  # the message already names the path
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StoreError(
            f"{path}: cannot open this {kind} store ({reason}); it is damaged or truncated: "
            "copy it again or re-extract it"
        ) from err


def staging_path(path: Path) -> Path:
    """A fresh hidden sibling of ``path`` to build a store in before publishing it."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"


def build_backend(
    kind: str, path: Path, specs: list[ArraySpec], attrs: dict[str, Any]
) -> ArrayBackend:
    """Create a new store of format ``kind`` at ``path`` (which must not exist), open to write."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown store backend {kind!r}; valid: {BACKENDS}")
    make_parents(path)
    return (ZarrBackend if kind == "zarr" else Hdf5Backend).build(path, specs, attrs)


def publish(staged: Path, final: Path, *, overwrite: bool = False) -> None:
    """Move a fully built store from ``staged`` to ``final`` in one rename.

    Without overwrite, raises FileExistsError when ``final`` already holds something (an empty
    directory does not count), so concurrent creators agree on one winner.
    """
    if staged.is_dir():
        if overwrite and final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        try:
            os.rename(staged, final)  # replaces an empty directory, fails on a non-empty one
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(f"{final} already exists") from err
            raise
        return
    if overwrite:
        os.replace(staged, final)
        return
    try:
        os.link(staged, final)  # atomic and exclusive: raises FileExistsError when final exists
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        if final.exists():
            raise FileExistsError(f"{final} already exists") from None
        os.replace(staged, final)
        return
    os.unlink(staged)
