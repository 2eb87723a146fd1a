"""Frame sources: video files (decord, PyAV fallback) and JPEG frame folders.

Every source answers two questions: how many frames it has (`num_frames`) and what the frames
at some indices look like (`read(indices)` -> uint8 RGB array `[T, H, W, 3]`). Anything that
goes wrong while opening or decoding raises `DecodeError` with a reason a person can read; the
extraction runner records that text for the failed video and moves on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from fsar.config import ConfigError
from fsar.errors import FsarError

BACKENDS = ("auto", "decord", "pyav")
JPEG_SUFFIXES = (".jpg", ".jpeg")
# How a frame folder's files become frames 0..n-1: fsar keeps the JPEGs in natural order
# (`img_2` < `img_10`); the releases sort every entry as plain strings, non-images included
# (`Thumbs.db` < `img_1.jpg` < `img_10.jpg` < `img_2.jpg`), so frame numbers are positions in
# that listing and a stray entry is a frame that fails to decode when read.
FOLDER_LISTINGS = ("natural_images", "sorted_all")


class DecodeError(FsarError, RuntimeError):
    """A video or frame folder could not be read; `str(e)` says why, naming the path."""


@runtime_checkable
class FrameSource(Protocol):
    """A decodable sequence of frames."""

    num_frames: int

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at `indices` (any order, repeats allowed): uint8 RGB `[len(indices), H, W, 3]`."""
        ...


def open_source(
    path: Path, backend: str = "auto", threads: int = 0, listing: str = "natural_images"
) -> FrameSource:
    """Open a video file or a JPEG frame folder.

    path: a directory (JPEG frame folder, ordered by ``listing``) or a video file (mp4, avi,
        webm, ... anything FFmpeg reads).
    listing: 'natural_images' (the `*.jpg` / `*.jpeg` files, natural sort, so `img_2` <
        `img_10`) or 'sorted_all' (every entry, plain string sort: the releases' rule).
    backend: for video files, 'auto' (decord, falling back to PyAV when decord is missing or
        fails on the file), 'decord' or 'pyav'. Ignored for frame folders.
    threads: decoder threads (0 = the library's default). Use 1 inside DataLoader workers.
    Raises DecodeError for a missing or empty file, an undecodable video or an empty folder.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown video backend {backend!r}; valid: {', '.join(BACKENDS)}")
    path = Path(path)
    if path.is_dir():
        return JpegFolderSource(path, listing)
    if not path.exists():
        raise DecodeError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise DecodeError(f"empty file (0 bytes): {path}")
    if backend == "decord":
        return DecordSource(path, threads)
    if backend == "pyav":
        return PyAVSource(path, threads)
    try:
        return _FallbackSource(DecordSource(path, threads), path, threads)
    except DecodeError as decord_error:
        try:
            return PyAVSource(path, threads)
        except DecodeError as pyav_error:
            raise DecodeError(f"{pyav_error} (decord: {decord_error})") from pyav_error


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders embedded numbers by value: 'f2.jpg' < 'f10.jpg'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _check_indices(indices: Sequence[int], num_frames: int, path: Path) -> list[int]:
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"no frame indices requested from {path}")
    bad = [i for i in indices if not 0 <= i < num_frames]
    if bad:
        raise DecodeError(f"frame index {bad[0]} out of range [0, {num_frames}) in {path}")
    return indices


def list_frame_folder(directory: Path, listing: str = "natural_images") -> list[Path]:
    """The files of a frame folder in frame order under ``listing`` (see FOLDER_LISTINGS)."""
    if listing not in FOLDER_LISTINGS:
        raise ValueError(f"unknown frame listing {listing!r}; valid: {', '.join(FOLDER_LISTINGS)}")
    directory = Path(directory)
    if listing == "sorted_all":  # os.scandir + sorted(names), as the releases
        with os.scandir(directory) as entries:
            return [directory / name for name in sorted(entry.name for entry in entries)]
    files = [p for p in directory.iterdir() if p.suffix.lower() in JPEG_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


class JpegFolderSource:
    """A folder of JPEG frames, one file per frame, in the order of ``listing``."""

    def __init__(self, directory: Path, listing: str = "natural_images"):
        self.path = Path(directory)
        self.listing = listing
        self.files = list_frame_folder(self.path, listing)
        if not any(p.suffix.lower() in JPEG_SUFFIXES for p in self.files):
            raise DecodeError(f"no JPEG frames in folder {self.path}")
        self.num_frames = len(self.files)

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 `[len(indices), H, W, 3]`; all frames of a folder must share one size."""
        indices = _check_indices(indices, self.num_frames, self.path)
        decoded = {i: _read_jpeg(self.files[i]) for i in sorted(set(indices))}
        shapes = {frame.shape for frame in decoded.values()}
        if len(shapes) > 1:
            raise DecodeError(f"frames of different sizes {sorted(shapes)} in {self.path}")
        return _stack([decoded[i] for i in indices])


def _read_jpeg(path: Path) -> np.ndarray:
    """One JPEG as uint8 RGB ``[H, W, 3]``.

    torchvision's libjpeg-turbo decoder gives the same pixels as PIL at about 1.4x the speed
    (no image object in between); PIL reads whatever it refuses (e.g. CMYK or odd markers).
    """
    try:
        # torchvision 0.29 announces a future move to TorchCodec on import and on every call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg, read_file

            image = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
        return image.permute(1, 2, 0).numpy()
    except Exception:  # fall through to PIL, which names the problem if it fails too
        pass
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as e:  # PIL raises several unrelated types
        raise DecodeError(f"cannot decode {path}: {e}") from e


class DecordSource:
    """A video file decoded by decord (random access by frame index)."""

    def __init__(self, path: Path, threads: int = 0):
        self.path = Path(path)
        try:
            import decord
        except ImportError as e:
            raise DecodeError(f"cannot decode {self.path}: decord is not installed") from e
        # Its bundled FFmpeg's log off: a damaged file is reported once, by the DecodeError text
        # stored with the video, not by library lines on the terminal.
        decord.logging.set_level(decord.logging.QUIET)
        try:
            with _native_stderr_discarded():
                self._reader = decord.VideoReader(str(self.path), num_threads=threads)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())  # CLIP-FSAR's Kinetics-100 clip uses it
        except Exception as e:  # decord raises its own DECORDError and RuntimeError
            raise DecodeError(f"cannot decode {self.path}: {_first_line(e)}") from e
        if self.num_frames == 0:
            raise DecodeError(f"cannot decode {self.path}: the video has no frames")

    def read(self, indices: Sequence[int]) -> np.ndarray:
        indices = _check_indices(indices, self.num_frames, self.path)
        unique = sorted(set(indices))
        try:
            with _native_stderr_discarded():
                batch = self._reader.get_batch(unique).asnumpy()  # [U, H, W, 3] uint8
        except Exception as e:
            raise DecodeError(f"cannot decode {self.path}: {_first_line(e)}") from e
        position = {frame: row for row, frame in enumerate(unique)}
        return np.ascontiguousarray(batch[[position[i] for i in indices]])


class PyAVSource:
    """A video file decoded sequentially by PyAV (FFmpeg).

    `num_frames` counts the video stream's packets (demuxing, no decoding). `read` decodes from
    the start up to the largest requested index; if the stream ends early (a truncated file), the
    missing indices repeat the last decoded frame.
    """

    def __init__(self, path: Path, threads: int = 0):
        self.path = Path(path)
        self.threads = threads
        try:
            import av

            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise DecodeError(f"cannot decode {self.path}: no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate
                self.fps = float(rate) if rate else 0.0
                self.num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except DecodeError:
            raise
        except Exception as e:  # av.error.* and ImportError
            raise DecodeError(f"cannot decode {self.path}: {_first_line(e)}") from e
        if self.num_frames == 0:
            raise DecodeError(f"cannot decode {self.path}: the video has no frames")

    def read(self, indices: Sequence[int]) -> np.ndarray:
        import av

        indices = _check_indices(indices, self.num_frames, self.path)
        wanted = set(indices)
        last = max(indices)
        decoded: dict[int, np.ndarray] = {}
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                if self.threads:
                    stream.codec_context.thread_count = self.threads
                final = None
                for number, frame in enumerate(container.decode(stream)):
                    final = frame
                    if number in wanted:
                        decoded[number] = frame.to_ndarray(format="rgb24")
                    if number >= last:
                        break
                if final is None:
                    raise DecodeError(f"cannot decode {self.path}: no frame could be decoded")
                if len(decoded) < len(wanted):  # the stream ended before `last`
                    fill = final.to_ndarray(format="rgb24")
                    decoded.update({i: fill for i in wanted if i not in decoded})
        except DecodeError:
            raise
        except Exception as e:  # av.error.* (FFmpeg's message)
            raise DecodeError(f"cannot decode {self.path}: {_first_line(e)}") from e
        return _stack([decoded[i] for i in indices])


class _FallbackSource:
    """decord first; if decord fails while reading this file, PyAV reads it instead."""

    def __init__(self, primary: DecordSource, path: Path, threads: int):
        self._primary = primary
        self._path = path
        self._threads = threads
        self.num_frames = primary.num_frames
        self.fps = primary.fps

    def read(self, indices: Sequence[int]) -> np.ndarray:
        try:
            return self._primary.read(indices)
        except DecodeError as decord_error:
            try:
                fallback = PyAVSource(self._path, self._threads)
                clamped = [min(int(i), fallback.num_frames - 1) for i in indices]
                return fallback.read(clamped)
            except DecodeError as pyav_error:
                raise DecodeError(f"{pyav_error} (decord: {decord_error})") from pyav_error


@contextlib.contextmanager
def _native_stderr_discarded() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a native call that logs on its own.

    decord's C++ core prints ``video_reader.cc: ERROR opening ...`` straight to the process's
    stderr (no switch turns it off) and then raises with the same reason, which we keep. Only the
    span of one open or read is silenced; decoding runs in DataLoader workers or sequentially
    in the main thread, so no progress bar or message of ours is written meanwhile.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no stderr to protect (closed or replaced)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(frames, axis=0))  # [T, H, W, 3]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
