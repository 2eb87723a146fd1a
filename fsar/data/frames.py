"""Frame-index policies (SPEC 3): which source frames of a video get decoded and cached, and
which cached frames a training episode uses.

Extraction (`select_frames`):
- `reference_test` (T = seq_len): `int(linspace(1, n-2, T))`; `int(linspace(0, n-1, T))` when
  `n - 3 < T`. The official releases' deterministic test frames.
- `uniform:K`: `int(linspace(0, n-1, K))`; all n frames when `n <= K`.
- `all`: every frame, up to `t_cap`.
- `dense` / `dense:CAP` (T_cap = CAP, default `t_cap`): every source frame, so that episodes can
  draw *source* frames with a release's own rules (`release_indices`) and gather the cached
  rows. A video longer than CAP caches `int(linspace(0, n-1, CAP))` instead; `frame_index`
  records which, and a draw of an uncached frame takes the nearest cached one.
Training (`train_frame_positions`): the releases' random training policy, applied to the cached
frames of a batch of videos at once.

`int(...)` truncates toward zero, as the releases' `[int(f) for f in np.linspace(...)]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fsar.config import ConfigError
from fsar.data.release_frames import RULES as RELEASE_RULES
from fsar.data.release_frames import (
    ReleaseFrameError,
    cached_positions,
    reachable_frames,
    release_indices,
)
from fsar.data.video import DecodeError

POLICY_KINDS = ("reference_test", "uniform", "all", "dense")
_VALID_FORMS = (
    "'reference_test', 'reference_test:T', 'uniform:K', 'all', 'all:T_CAP', 'dense', 'dense:CAP'"
)


class ShortVideoError(DecodeError):
    """The video has fewer frames than the frame policy needs."""


@dataclass(frozen=True)
class FramePolicy:
    """How to pick source frames. `count` is T (reference_test), K (uniform) or the cap (all)."""

    kind: str  # one of POLICY_KINDS
    count: int  # frames per video (the number of cached slots, T_cap)
    min_frames: int  # videos with fewer source frames fail with ShortVideoError

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ConfigError(f"unknown frame policy {self.kind!r}; valid: {_VALID_FORMS}")
        if self.count < 1 or self.min_frames < 1:
            raise ValueError(
                f"frame policy {self.kind}: count={self.count} and min_frames={self.min_frames} "
                "must both be >= 1"
            )

    @property
    def t_cap(self) -> int:
        """Number of cached frame slots per video (the store's T_cap)."""
        return self.count

    @property
    def spec(self) -> str:
        """Canonical text form, e.g. 'reference_test:8' (parse_frame_policy reads it back)."""
        return f"{self.kind}:{self.count}"


def parse_frame_policy(
    spec: str, *, seq_len: int = 8, t_cap: int = 64, min_frames: int | None = None
) -> FramePolicy:
    """Parse 'reference_test[:T]', 'uniform:K', 'all[:T_CAP]' or 'dense[:CAP]'.

    seq_len: T of 'reference_test' without a number. t_cap: cap of 'all' / 'dense' without a
        number.
    min_frames: shortest accepted video; default T for reference_test and dense (the releases
        skip or fail shorter videos), 1 for uniform and all.
    """
    kind, _, number = str(spec).strip().partition(":")
    defaults = {"reference_test": seq_len, "all": t_cap, "dense": t_cap}
    if kind not in POLICY_KINDS or (kind == "uniform" and not number):
        raise ConfigError(f"bad frame policy {spec!r}; valid forms: {_VALID_FORMS}")
    if number:
        if not number.isdigit() or int(number) < 1:
            raise ConfigError(
                f"bad frame count {number!r} in frame policy {spec!r}; expected a positive "
                f"integer; valid forms: {_VALID_FORMS}"
            )
        count = int(number)
    else:
        count = defaults[kind]
    if min_frames is None:
        min_frames = {"reference_test": count, "dense": seq_len}.get(kind, 1)
    return FramePolicy(kind, count, min_frames)


def select_frames(policy: FramePolicy, n_frames: int) -> list[int]:
    """Source frame indices to decode for a video of `n_frames` frames.

    Returns `policy.count` indices for reference_test, min(n, K) for uniform and dense,
    min(n, t_cap) for all. Raises ShortVideoError if `n_frames < policy.min_frames`.
    """
    n = int(n_frames)
    if n < max(policy.min_frames, 1):
        raise ShortVideoError(
            f"video has {n} frames, fewer than the {policy.min_frames} that frame policy "
            f"{policy.spec} needs (min_frames={policy.min_frames}; lower it, or use "
            "--frames uniform:K / all, to keep short videos)"
        )
    if policy.kind == "reference_test":
        start, end = (0, n - 1) if n - 3 < policy.count else (1, n - 2)
        return linspace_int(start, end, policy.count)
    if policy.kind in ("uniform", "dense"):
        return list(range(n)) if n <= policy.count else linspace_int(0, n - 1, policy.count)
    return list(range(min(n, policy.count)))


def linspace_int(start: int, end: int, num: int) -> list[int]:
    """`[int(f) for f in np.linspace(start, end, num)]`."""
    return [int(f) for f in np.linspace(start, end, num)]


def train_frame_positions(
    n_valid: torch.Tensor, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """The releases' training frame sampling over cached frames, for a batch of videos.

    n_valid: [B] number of cached frames of each video (>= 1).
    Returns long [B, seq_len], positions into each video's cached frames (< n_valid), on
    n_valid's device. Per video: `pad = int(min(5, (n - T) / 2))`; if pad >= 1,
    `start ~ U{0..pad}`, `end ~ U{n-1-pad..n-1}`, else `start, end = 0, n-1`; as in the
    releases, `start, end = 0, n-1` also when `end - start < T`; then `int(linspace(start,
    end, T))`. Videos with n < T repeat frames. Draws 2 uniforms per video from `generator`.
    """
    n = n_valid.long()
    if n.ndim != 1:
        raise ValueError(f"n_valid must be 1-D [B], got shape {tuple(n.shape)}")
    if n.numel() and int(n.min()) < 1:
        rows = torch.nonzero(n < 1).flatten().tolist()[:5]
        raise ValueError(f"n_valid must be >= 1 (no frames cached for batch rows {rows})")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    draws = torch.rand(2, n.shape[0], generator=generator, device=generator.device)
    draws = draws.to(device=n.device, dtype=torch.float64)  # [2, B]
    pad = torch.clamp((n - seq_len).double() / 2, max=5).trunc().long()  # int() truncates
    pad = torch.clamp(pad, min=0)  # pad < 1 means no jitter
    start = (draws[0] * (pad + 1)).floor().long().clamp(max=pad)  # U{0..pad}
    end = n - 1 - pad + (draws[1] * (pad + 1)).floor().long().clamp(max=pad)  # U{n-1-pad..n-1}
    full = end - start < seq_len
    start = torch.where(full, torch.zeros_like(start), start)
    end = torch.where(full, n - 1, end)
    return linspace_trunc(start, end, seq_len)


def linspace_trunc(start: torch.Tensor, end: torch.Tensor, num: int) -> torch.Tensor:
    """Batched `int(np.linspace(start, end, num))` in float64, same arithmetic as numpy.

    start, end: long [B]. Returns long [B, num].
    """
    start_f, end_f = start.double()[:, None], end.double()[:, None]  # [B, 1]
    if num == 1:
        return start[:, None].clone()
    steps = torch.arange(num, dtype=torch.float64, device=start.device)[None, :]  # [1, num]
    values = steps * ((end_f - start_f) / (num - 1)) + start_f  # [B, num]
    values[:, -1] = end_f[:, 0]  # numpy sets the endpoint exactly
    return values.trunc().long()


__all__ = [
    "POLICY_KINDS",
    "RELEASE_RULES",
    "FramePolicy",
    "ReleaseFrameError",
    "ShortVideoError",
    "cached_positions",
    "linspace_int",
    "linspace_trunc",
    "parse_frame_policy",
    "reachable_frames",
    "release_indices",
    "select_frames",
    "train_frame_positions",
]
