"""Parts of the HyRSM / HyRSM++ heads: the release's position code, its two attentions, the
set-matching distance and the temporal regulariser.

Attribute names are the release's (`norm`, `fn.to_qkv`, `fn.to_out.0`, `w_qs`, `fc`,
`layer_norm`, ...), so the heads' state-dict keys equal the official ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import Dropout

__all__ = [
    "FrameAttention",
    "SetAttention",
    "position_code",
    "bidirectional_min_distance",
    "temporal_regular_loss",
]


def position_code(t: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The release's `PositionalEncoder` table [t, dim] (float64).

    Column j holds sin (even j) or cos (odd j) of `p / 10000^(2j/dim)`: unlike the usual code the
    exponent uses j itself, not j rounded down to even, so sin/cos pairs have different rates.
    """
    p = torch.arange(t, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(dim, dtype=torch.float64, device=device)
    angle = p / 10000.0 ** (2 * j / dim)
    return torch.where(j.remainder(2) == 0, angle.sin(), angle.cos())


class _FusedQKVAttention(nn.Module):
    """Multi-head self-attention with one bias-free `to_qkv` (split q|k|v) and `to_out`."""

    def __init__(self, dim: int, heads: int, inner: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        # as the release: no output projection for one head as wide as the input
        project = not (heads == 1 and inner == dim)
        self.to_out = (
            nn.Sequential(nn.Linear(inner, dim), Dropout(dropout)) if project else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [V, T, dim] -> [V, T, dim]."""
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, -1)
        )
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [V, h, T, T]
        out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # [V, T, inner]
        return self.to_out(out)


class FrameAttention(nn.Module):
    """Pre-norm residual self-attention over the frames of each video: `x + fn(norm(x))`."""

    def __init__(self, dim: int, heads: int, inner: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = _FusedQKVAttention(dim, heads, inner, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(self.norm(x))


class SetAttention(nn.Module):
    """Post-norm multi-head attention over a set: `norm(x + fc(MHA(x)))` (MultiHeadAttention).

    Bias-free w_qs/w_ks/w_vs, scores scaled by dim_head^-0.5, dropout on the attention weights and
    after `fc`; initialised as the release.
    """

    def __init__(self, dim: int, heads: int, inner: int, attn_dropout: float, dropout: float):
        super().__init__()
        self.heads = heads
        dim_head = inner // heads
        self.w_qs = nn.Linear(dim, inner, bias=False)
        self.w_ks = nn.Linear(dim, inner, bias=False)
        self.w_vs = nn.Linear(dim, inner, bias=False)
        for w in (self.w_qs, self.w_ks, self.w_vs):
            nn.init.normal_(w.weight, std=math.sqrt(2.0 / (dim + dim_head)))
        self.attn_drop = Dropout(attn_dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(inner, dim)
        nn.init.xavier_normal_(self.fc.weight)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x [V, L, dim] -> [V, L, dim]."""
        q, k, v = (
            w(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for w in (self.w_qs, self.w_ks, self.w_vs)
        )
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [V, h, L, L]
        out = (self.attn_drop(scores.softmax(-1)) @ v).transpose(1, 2).flatten(2)  # [V, L, inner]
        return self.layer_norm(self.drop(self.fc(out)) + x)


def bidirectional_min_distance(support: Tensor, query: Tensor) -> Tensor:
    """HyRSM's set matching: support [..., M, T, D], query [..., T, D] -> [..., M].

    With d = 1 - cos (exact cosine, F.normalize) between every support frame and query frame:
    sum over support frames of the nearest query frame + sum over query frames of the nearest
    support frame.
    """
    s = F.normalize(support, dim=-1)
    q = F.normalize(query, dim=-1)[..., None, :, :]
    d = 1 - s @ q.transpose(-1, -2)  # [..., M, T_s, T_q]
    return d.min(-1).values.sum(-1) + d.min(-2).values.sum(-1)


def temporal_regular_loss(
    frames: Tensor, window: int, balance: float, coefficient: float
) -> Tensor:
    """HyRSM++'s temporal regulariser of the videos frames [B, ..., T, D], mean per episode -> [B].

    F = 1 - cos between a video's own frames; within `window` frames F is pulled down with weight
    1/((i-j)^2+1); beyond it `coefficient * relu(W - F)` with W = 1 - exp(-(|i-j|-window)^2 /
    balance) pushes distant frames apart.
    """
    t = frames.shape[-2]
    steps = torch.arange(t, device=frames.device)
    gap = (steps[:, None] - steps[None]).abs().to(frames.dtype)
    near = (gap <= window).to(frames)
    weight = torch.where(
        gap <= window, 1 / (gap**2 + 1), 1 - torch.exp(-((gap - window) ** 2) / balance)
    )
    x = F.normalize(frames, dim=-1)
    dist = 1 - x @ x.transpose(-1, -2)  # [B, *, T, T]
    terms = dist * near * weight + coefficient * (1 - near) * F.relu(weight - dist)
    return terms.flatten(1).mean(-1)
