"""Shared fixtures: the shared folder beside the checkout and a small rendered video dataset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("FSAR_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.fail(f"the shared folder is missing: expected {path} (or set FSAR_SHARED)")
    return path


def moving_square(n_frames: int, size: int, colour, direction: int, seed: int) -> np.ndarray:
    """uint8 [T, H, W, 3]: a coloured square crossing a noisy background."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 40, size=(n_frames, size, size, 3), dtype=np.uint8)
    side = size // 4
    for t in range(n_frames):
        x = int((t / max(n_frames - 1, 1)) * (size - side))
        x = x if direction > 0 else size - side - x
        frames[t, size // 3 : size // 3 + side, x : x + side] = colour
    return frames


@pytest.fixture(scope="session")
def video_root(tmp_path_factory) -> Path:
    """A `folder` dataset: 3 classes x 4 mp4 videos, one JPEG-folder video, and the failures
    the runner must survive (corrupt, empty, missing, too short), with split lists."""
    from fsar.data.synthetic import write_frame_folder, write_video

    root = tmp_path_factory.mktemp("videos")
    classes = {
        "push_left": ((220, 40, 40), -1),
        "push_right": ((220, 40, 40), 1),
        "lift": ((40, 40, 220), 1),
    }
    train, test = [], []
    for c, (name, (colour, direction)) in enumerate(classes.items()):
        for v in range(4):
            frames = moving_square(12 + v, 48, colour, direction, seed=10 * c + v)
            write_video(root / name / f"v{v}.mp4", frames, fps=12)
            (train if v < 2 else test).append(f"{name}/v{v}")
    write_frame_folder(root / "lift" / "jpeg_clip", moving_square(10, 48, (40, 40, 220), -1, 99))
    test.append("lift/jpeg_clip")
    (root / "lift" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "lift" / "empty.mp4").write_bytes(b"")
    write_video(root / "push_left" / "short.mp4", moving_square(3, 48, (220, 40, 40), -1, 5))
    test += ["lift/corrupt", "lift/empty", "push_left/short", "lift/missing_clip"]
    (root / "trainlist.txt").write_text("\n".join(train) + "\n")
    (root / "testlist.txt").write_text("\n".join(test) + "\n")
    return root


def run_fsar(
    *args: str, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (as users do)."""
    result = subprocess.run(
        [sys.executable, "-m", "fsar", *args],
        capture_output=True,
        text=True,
        env=_cli_env(env),
        cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"fsar {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
        )
    return result


def start_fsar(*args: str, env: dict | None = None) -> subprocess.Popen:
    """Start the real CLI in a subprocess without waiting (to signal or kill it mid-run); its
    stdout and stderr are captured as text (read them with ``communicate``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fsar", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(env),
    )


def _cli_env(extra: dict | None) -> dict:
    # unbuffered, so that a killed run's output is not lost in its buffers
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}


def assert_same_store(a: Path, b: Path) -> None:
    """Two stores hold exactly the same recipe, rows, features, layers and class text."""
    from fsar.cache import open_store

    left, right = open_store(a), open_store(b)
    assert left.fingerprint == right.fingerprint
    assert list(left.video_ids) == list(right.video_ids)
    assert list(left.errors) == list(right.errors)
    for name in ("status", "n_frames", "frame_index"):
        np.testing.assert_array_equal(getattr(left, name), getattr(right, name))
    assert left.layout.views == right.layout.views
    for view in left.layout.views:
        np.testing.assert_array_equal(left.read_features(view), right.read_features(view))
        for layer in left.layout.layer_dims:
            np.testing.assert_array_equal(
                left.read_layer(view, layer), right.read_layer(view, layer)
            )
    np.testing.assert_array_equal(left.class_text, right.class_text)
