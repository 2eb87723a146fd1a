"""The releases' own source-frame index rules (golden/data_path/README.md is normative).

Every rule maps a video of ``n_frames`` decoded frames (and, for Kinetics-100, its fps) to the
8 source frame numbers the release feeds its encoder:

- ``clipspm_test``: CLIP-SPM's deterministic test frames (``reference_test``).
- ``clipspm_train``: CLIP-SPM's training jitter, ``start ~ U{0..pad}``, ``end ~ U{n-1-pad..n-1}``
  with ``pad = int(min(5, (n-T)/2))``, over every source frame.
- ``clipfsar_segment``: CLIP-FSAR with SAMPLING_RATE 50 (SSv2, HMDB51, UCF101), test and train:
  one uniform frame in each of 8 segments of ``n // 8`` frames, redrawn every time the video is
  loaded; fewer than 8 frames raises.
- ``clipfsar_k100_test``: CLIP-FSAR on Kinetics-100 (SAMPLING_RATE 35) at test: the centred
  clip of ``8 * 35 * fps / 12`` frames (deterministic, depends on fps).
- ``clipfsar_k100_train``: the same clip with ``start ~ uniform(0, max_idx)``.

The functions are pure: the randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import numpy as np
import torch

from fsar.errors import FsarError

SEQ_LEN = 8  # both releases: 8 frames per video
K100_SAMPLING_RATE = 35
K100_TARGET_FPS = 12
RULES = (
    "clipspm_test",
    "clipspm_train",
    "clipfsar_segment",
    "clipfsar_k100_test",
    "clipfsar_k100_train",
)
RANDOM_RULES = ("clipspm_train", "clipfsar_segment", "clipfsar_k100_train")
FPS_RULES = ("clipfsar_k100_test", "clipfsar_k100_train")

# protocol values that keep fsar's own rules over the cached frames
CACHED_TEST = ("cached", "segment_random")
KINETICS = ("kinetics",)


class ReleaseFrameError(FsarError, ValueError):
    """A video the release's frame rule cannot sample (CLIP-FSAR: fewer than 8 frames)."""


def release_indices(
    rule: str,
    n_frames: int,
    rng: np.random.Generator | None = None,
    fps: float | None = None,
    seq_len: int = SEQ_LEN,
) -> np.ndarray:
    """Source frame numbers (int64 [seq_len]) the release ``rule`` reads from a video.

    rule: one of RULES. n_frames: decoded length L (CLIP-SPM: entries listed in the folder).
    rng: required by the random rules (RANDOM_RULES). fps: the video's average fps, required by
    the Kinetics-100 rules. Raises ReleaseFrameError where the release raises (CLIP-FSAR
    segments with L < 8), ValueError for a bad call.
    """
    n = int(n_frames)
    if rule not in RULES:
        raise ValueError(f"unknown release frame rule {rule!r}; valid: {', '.join(RULES)}")
    if rule in RANDOM_RULES and rng is None:
        raise ValueError(f"release frame rule {rule} is random: pass rng")
    if rule in FPS_RULES and (fps is None or not np.isfinite(fps) or fps <= 0):
        raise ValueError(f"release frame rule {rule} needs the video's fps, got {fps!r}")
    if n < 1:
        raise ReleaseFrameError(f"a video of {n} frames has no frames to sample")
    if rule == "clipspm_test":
        return clipspm_indices(n, None, None, seq_len)
    if rule == "clipspm_train":
        pad = clipspm_pad(n, seq_len)
        if pad < 1 or n == seq_len:
            return clipspm_indices(n, None, None, seq_len)
        start = int(rng.integers(0, pad + 1))
        end = int(rng.integers(n - 1 - pad, n))
        return clipspm_indices(n, start, end, seq_len)
    if rule == "clipfsar_segment":
        low, high = segment_ranges(n, seq_len)
        return rng.integers(low, high + 1).astype(np.int64)
    start = None if rule == "clipfsar_k100_test" else rng.uniform(0.0, k100_max_idx(n, fps))
    return k100_indices(n, float(fps), start, seq_len)


def clipspm_pad(n: int, seq_len: int = SEQ_LEN) -> int:
    """CLIP-SPM's jitter width ``int(min(5, (n - T) / 2))`` (truncates toward zero)."""
    return int(min(5, (n - seq_len) / 2))


def clipspm_indices(
    n: int, start: int | None, end: int | None, seq_len: int = SEQ_LEN
) -> np.ndarray:
    """CLIP-SPM's ``get_seq`` for drawn (start, end), or the test frames when both are None."""
    if n == seq_len:
        return np.arange(seq_len, dtype=np.int64)
    if start is None or end is None:
        start, end = 1, n - 2
    if end - start < seq_len:
        start, end = 0, n - 1
    # float64 linspace truncated toward zero, as the release's [int(f) for f in np.linspace(...)]
    return np.trunc(np.linspace(start, end, seq_len)).astype(np.int64)


def segment_ranges(n: int, seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-FSAR's inclusive per-segment ranges (SAMPLING_RATE 50): int64 [T] low, high."""
    interval = n // seq_len
    if interval < 1:
        raise ReleaseFrameError(
            f"a video of {n} frames is shorter than the {seq_len} segments CLIP-FSAR samples "
            "(the release raises on it and redraws the episode)"
        )
    low = np.arange(seq_len, dtype=np.int64) * interval
    return low, low + interval - 1


def k100_clip_length(n: int, fps: float, seq_len: int = SEQ_LEN) -> float:
    length = seq_len * K100_SAMPLING_RATE * fps / K100_TARGET_FPS
    return float((n // seq_len) * seq_len) if length > n else length


def k100_max_idx(n: int, fps: float, seq_len: int = SEQ_LEN) -> float:
    return max(n - k100_clip_length(n, fps, seq_len) + 1, 0)


def k100_indices(
    n: int, fps: float, start: float | None = None, seq_len: int = SEQ_LEN
) -> np.ndarray:
    """CLIP-FSAR's Kinetics-100 clip starting at ``start`` (None: the test's ``max_idx / 2``).

    The release computes ``torch.linspace(start, end, T)`` in float32, clamps to [0, L-1] and
    truncates; torch's own linspace is used so the float32 rounding is the release's.
    """
    length = k100_clip_length(n, fps, seq_len)
    if start is None:
        start = k100_max_idx(n, fps, seq_len) / 2
    end = start + length - K100_SAMPLING_RATE
    values = torch.linspace(start, end, seq_len, dtype=torch.float32)
    return torch.clamp(values, 0, n - 1).long().numpy().astype(np.int64)


def reachable_frames(rule: str, n_frames: int, fps: float | None = None) -> np.ndarray:
    """Every source frame ``rule`` can read from a video of n frames (sorted int64).

    The Kinetics-100 training start is continuous: its reachable set is the union over the
    integer starts and the maximum (a superset of the exact set, which the clamps keep small).
    """
    n = int(n_frames)
    if rule == "clipspm_test" or rule == "clipfsar_k100_test":
        return np.unique(release_indices(rule, n, fps=fps))
    if rule == "clipspm_train":
        pad = clipspm_pad(n)
        if pad < 1 or n == SEQ_LEN:
            return np.unique(clipspm_indices(n, None, None))
        sets = [
            clipspm_indices(n, s, e)
            for s in range(pad + 1)
            for e in range(n - 1 - pad, n)  # every (start, end) pair the release can draw
        ]
        return np.unique(np.concatenate(sets))
    if rule == "clipfsar_segment":
        low, high = segment_ranges(n)
        return np.arange(int(low[0]), int(high[-1]) + 1, dtype=np.int64)
    if rule == "clipfsar_k100_train":
        top = k100_max_idx(n, float(fps))
        starts = [*range(int(np.floor(top)) + 1), top]
        return np.unique(np.concatenate([k100_indices(n, float(fps), float(s)) for s in starts]))
    raise ValueError(f"unknown release frame rule {rule!r}; valid: {', '.join(RULES)}")


def cached_positions(frame_index: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, bool]:
    """Rows of a video's cache holding the source frames ``source``.

    frame_index: int [n_cached] source frame number of each cached row (ascending, as the
    dense policy writes it); source: int [T]. Returns (rows int64 [T], exact): a frame not
    cached (a video longer than a dense store's cap) takes the cached frame nearest to it
    (the earlier one on a tie), and ``exact`` is False then.
    """
    cached = np.asarray(frame_index, dtype=np.int64)
    wanted = np.asarray(source, dtype=np.int64)
    if cached.size == 0:
        raise ValueError("the video has no cached frames")
    right = np.clip(np.searchsorted(cached, wanted), 0, cached.size - 1)
    left = np.clip(right - 1, 0, cached.size - 1)
    take_left = np.abs(cached[left] - wanted) <= np.abs(cached[right] - wanted)
    rows = np.where(take_left, left, right)
    return rows.astype(np.int64), bool(np.array_equal(cached[rows], wanted))


def resolve_rule(value: str, dataset: str | None) -> str | None:
    """The release rule a protocol value names for ``dataset`` (None: fsar's cached rules)."""
    if value in CACHED_TEST:
        return None
    kinetics = str(dataset or "") in KINETICS
    if value == "clipfsar_test":
        return "clipfsar_k100_test" if kinetics else "clipfsar_segment"
    if value == "clipfsar_train":
        return "clipfsar_k100_train" if kinetics else "clipfsar_segment"
    return value
