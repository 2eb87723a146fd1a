"""Video sources: real files written with PyAV, decoded with decord and PyAV; JPEG folders."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fsar.data import video
from fsar.data.synthetic import write_frame_folder, write_video
from fsar.data.video import DecodeError, FrameSource, open_source

T, H, W = 12, 48, 64
SUFFIXES = (".mp4", ".avi", ".webm")
BACKENDS = ("decord", "pyav", "auto")
TOLERANCE = 12  # lossy codecs + yuv420p round trip, on flat colours (0-255 scale)


def quadrant_frames(n: int = T) -> np.ndarray:
    """uint8 [n, H, W, 3]: four flat quadrants whose colours change with the frame number."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    for t in range(n):
        colours = quadrant_colours(t)
        for q, (rows, cols) in enumerate(_quadrants()):
            frames[t, rows, cols] = colours[q]
    return frames


def quadrant_colours(t: int) -> np.ndarray:
    """[4, 3] RGB of the quadrants of frame t (distinct channels, so RGB/BGR swaps show)."""
    return np.array(
        [
            (20 + 15 * t, 200, 60),
            (230, 30 + 12 * t, 120),
            (40, 90, 220 - 10 * t),
            (180 - 8 * t, 160, 20 + 9 * t),
        ]
    )


def _quadrants() -> list[tuple[slice, slice]]:
    top, bottom, left, right = (
        slice(0, H // 2),
        slice(H // 2, H),
        slice(0, W // 2),
        slice(W // 2, W),
    )
    return [(top, left), (top, right), (bottom, left), (bottom, right)]


def quadrant_centres(frames: np.ndarray) -> np.ndarray:
    """[T, 4, 3] pixel values at the quadrant centres (away from chroma-subsampled edges)."""
    points = [
        (H // 4, W // 4),
        (H // 4, 3 * W // 4),
        (3 * H // 4, W // 4),
        (3 * H // 4, 3 * W // 4),
    ]
    return np.stack([frames[:, y, x].astype(int) for y, x in points], axis=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    paths = {}
    for suffix in SUFFIXES:
        paths[suffix] = folder / f"quadrants{suffix}"
        write_video(paths[suffix], quadrant_frames())
    return paths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_video_files_decode_to_the_frames_that_were_written(videos, suffix, backend):
    source = open_source(videos[suffix], backend=backend)
    assert isinstance(source, FrameSource)
    assert source.num_frames == T
    indices = [0, 7, 11, 3, 7]  # unordered, with a repeat
    frames = source.read(indices)
    assert frames.shape == (len(indices), H, W, 3) and frames.dtype == np.uint8
    expected = np.stack([quadrant_colours(t) for t in indices])
    assert np.abs(quadrant_centres(frames) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_decord_and_pyav_decode_the_same_pixels(videos, suffix):
    everything = list(range(T))
    by_decord = open_source(videos[suffix], backend="decord").read(everything).astype(int)
    by_pyav = open_source(videos[suffix], backend="pyav").read(everything).astype(int)
    assert np.abs(by_decord - by_pyav).max() <= 3


def test_jpeg_folders_are_read_in_natural_order(tmp_path):
    frames = quadrant_frames()
    write_frame_folder(tmp_path / "clip", frames)
    assert sorted(p.name for p in (tmp_path / "clip").iterdir())[:2] == ["00001.jpg", "00002.jpg"]
    source = open_source(tmp_path / "clip")
    assert source.num_frames == T
    decoded = source.read([11, 0, 4])
    assert decoded.shape == (3, H, W, 3)
    expected = np.stack([quadrant_colours(t) for t in (11, 0, 4)])
    assert np.abs(quadrant_centres(decoded) - expected).max() <= TOLERANCE


def test_unpadded_frame_numbers_sort_by_value_not_by_text(tmp_path):
    from PIL import Image

    frames = quadrant_frames(11)
    for t in range(11):  # img_1 ... img_11: text order would put img_10 right after img_1
        suffix = ".JPG" if t % 2 else ".jpeg"  # both suffixes, any case
        Image.fromarray(frames[t]).save(tmp_path / f"img_{t + 1}{suffix}", format="JPEG")
    decoded = open_source(tmp_path).read(list(range(11)))
    expected = np.stack([quadrant_colours(t) for t in range(11)])
    assert np.abs(quadrant_centres(decoded) - expected).max() <= TOLERANCE


def test_jpeg_frames_are_the_pixels_pil_decodes_grey_and_corrupt_ones_included(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    for t in range(3):
        Image.fromarray(colour[t]).save(tmp_path / f"{t:02d}.jpg", quality=80)
    Image.fromarray(colour[0, ..., 0]).save(tmp_path / "03.jpg")  # single-channel JPEG
    decoded = open_source(tmp_path).read([0, 1, 2, 3])
    for t in range(4):
        with Image.open(tmp_path / f"{t:02d}.jpg") as image:
            np.testing.assert_array_equal(decoded[t], np.asarray(image.convert("RGB")))
    (tmp_path / "04.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DecodeError, match="cannot decode .*04.jpg"):
        open_source(tmp_path).read([4])


def test_a_folder_without_jpegs_is_a_readable_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no frames here")
    with pytest.raises(DecodeError, match="no JPEG frames in folder"):
        open_source(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_file_is_a_readable_error(tmp_path, backend):
    with pytest.raises(DecodeError, match="file not found: .*missing.mp4"):
        open_source(tmp_path / "missing.mp4", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_file_is_a_readable_error(tmp_path, backend):
    (tmp_path / "empty.webm").write_bytes(b"")
    with pytest.raises(DecodeError, match=r"empty file \(0 bytes\): .*empty.webm"):
        open_source(tmp_path / "empty.webm", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_file_is_a_readable_error(tmp_path, backend):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError, match="cannot decode .*corrupt.mp4: .+"):
        open_source(path, backend=backend).read([0])


def test_an_unknown_backend_names_the_valid_ones(videos):
    with pytest.raises(ValueError, match="'ffmpeg'.*auto, decord, pyav"):
        open_source(videos[".mp4"], backend="ffmpeg")


def test_frame_indices_outside_the_video_are_a_readable_error(videos):
    source = open_source(videos[".mp4"], backend="pyav")
    with pytest.raises(DecodeError, match=f"frame index {T} out of range"):
        source.read([0, T])


def test_auto_falls_back_to_pyav_when_decord_is_missing(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` fail
    with pytest.raises(DecodeError, match="decord is not installed"):
        open_source(videos[".webm"], backend="decord")
    source = open_source(videos[".webm"], backend="auto")
    assert isinstance(source, video.PyAVSource)
    frames = source.read([5])
    assert np.abs(quadrant_centres(frames) - quadrant_colours(5)).max() <= TOLERANCE


def test_auto_falls_back_to_pyav_when_decord_fails_while_reading(videos, monkeypatch):
    def broken_read(self, indices):
        raise DecodeError("cannot decode: simulated decord failure")

    monkeypatch.setattr(video.DecordSource, "read", broken_read)
    frames = open_source(videos[".avi"], backend="auto").read([2, 9])
    expected = np.stack([quadrant_colours(2), quadrant_colours(9)])
    assert np.abs(quadrant_centres(frames) - expected).max() <= TOLERANCE
