"""The parts of CLIP-SPM (SPEC 5.3): text-video fusion SE, prompt generator, HSMR and PADM."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .blocks import FeedForward, Gate, MotionModule, TransformerLayer
from .otam import OTAM_LAMBDA, otam_distance
from .output import Episode, EpisodeError

__all__ = [
    "TextVideoFusion",
    "PromptGenerator",
    "HSMR",
    "PADM",
    "ClassMeanOTAM",
    "squared_distance",
]

# `(frames [V, T, D], token [V, D]) -> (fused frames, fused token)`: CLIP-SPM's gated
# `TextVideoFusion` or CLIP-MEI's `AdditiveFusion`.
Fusion = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def squared_distance(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distance per video (sum over all but the first dim): [V, ...] -> [V]."""
    return (x - y).pow(2).flatten(1).sum(-1)


class TextVideoFusion(nn.Module):
    """`SE(x, tok)`: gated mix of a token into the frames, then the fusion transformer `TX2`.

    `x' = alpha * tok * g_t(tok) + x * g_v(x)`; `z = TX2([tok ; x'])` over T+1 tokens.
    """

    def __init__(
        self,
        transformer: TransformerLayer,
        dim: int,
        gate_text_ratio: float,
        gate_vision_ratio: float,
        negative_slope: float,
        alpha: float,
    ):
        super().__init__()
        self.transformer = transformer
        self.text_gate = Gate(dim, gate_text_ratio, negative_slope)
        self.vision_gate = Gate(dim, gate_vision_ratio, negative_slope)
        self.alpha = alpha

    def forward(self, frames: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        """frames [V, T, D], token [V, D] -> (fused frames [V, T, D], fused token [V, D])."""
        token = token[:, None]  # [V, 1, D]
        mixed = token * self.text_gate(token) * self.alpha + frames * self.vision_gate(frames)
        z = self.transformer(torch.cat([token, mixed], dim=1))  # [V, T+1, D]
        return z[:, 1:], z[:, 0]


class PromptGenerator(nn.Module):
    """Generated prompt `p(x) = FFN(tau * mean(x))`, mean over frames and channels."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.05):
        super().__init__()
        self.ffn = FeedForward(dim, hidden, dropout)

    def forward(self, episode_token: Tensor, videos: Tensor) -> Tensor:
        """episode_token [B, D], videos [B, V, T, D] -> prompts [B, V, D]."""
        return self.ffn(episode_token[:, None] * videos.mean(dim=(2, 3))[..., None])


class HSMR(nn.Module):
    """Hierarchical motion regulariser: `L = mean_q |M(x1) - tok1|^2 + mean_s |M(x1) - tok1|^2`.

    `m0 = M(proj(shallow))`, `(x1, tok1) = SE(x, m0)`. With `shallow_dim=None` the shallow level
    is the final embedding itself (`proj` = identity, the release); otherwise a cached
    intermediate backbone layer of width `shallow_dim`, mapped to D by a learnable linear layer.
    """

    def __init__(self, dim: int, shallow_dim: int | None = None):
        super().__init__()
        self.motion = MotionModule(dim)
        self.shallow_proj = nn.Identity() if shallow_dim is None else nn.Linear(shallow_dim, dim)

    def forward(
        self,
        fusion: Fusion,
        support: Tensor,
        query: Tensor,
        support_shallow: Tensor,
        query_shallow: Tensor,
    ) -> Tensor:
        """support [B,S,T,D], query [B,Q,T,D] and their shallow levels [B,*,T,D_l] -> scalar."""
        if support.shape[2] < 2:
            raise EpisodeError("HSMR needs at least T=2 frames for motion")
        n_support = support.shape[0] * support.shape[1]
        videos = torch.cat([support.flatten(0, 1), query.flatten(0, 1)])  # [V, T, D]
        shallow = torch.cat([support_shallow.flatten(0, 1), query_shallow.flatten(0, 1)])
        m0 = self.motion(self.shallow_proj(shallow))  # [V, D]
        fused, token = fusion(videos, m0)
        dist = squared_distance(self.motion(fused), token)  # [V]
        return dist[n_support:].mean() + dist[:n_support].mean()


class PADM(nn.Module):
    """Prototype-anchored task adaptation: distances [B, Q, N] from refined features.

    Class anchor `A_n` = mean over the K supports of class n and all Q queries; global anchor
    `g` = mean of the `A_n`. Per frame position, `TX1` attends over `[A_1..A_N, s_1..s_S]` and
    `[g, q_1..q_Q]`. `D2 = OTAM_bi(class means of refined s, refined q) + OTAM_bi(refined A,
    refined g)` (the second term is the same row for every query), soft-min temperature `lam`.
    """

    def __init__(self, transformer: TransformerLayer, lam: float = OTAM_LAMBDA):
        super().__init__()
        self.transformer = transformer
        self.lam = lam

    def _refine(self, tokens: Tensor) -> Tensor:
        # tokens [B, L, T, D]: attention over the set L at every frame position t
        b, n_set, t, d = tokens.shape
        flat = tokens.transpose(1, 2).reshape(b * t, n_set, d)  # [B*T, L, D]
        return self.transformer(flat).reshape(b, t, n_set, d).transpose(1, 2)

    def forward(self, episode: Episode, support: Tensor, query: Tensor) -> Tensor:
        n_way, n_query = episode.n_way, query.shape[1]
        shots = episode.shots[..., None, None].to(support.dtype)  # [B, N, 1, 1]
        class_sums = episode.class_means(support) * shots  # [B, N, T, D]
        anchors = (class_sums + query.sum(1, keepdim=True)) / (shots + n_query)  # [B, N, T, D]
        global_anchor = anchors.mean(1, keepdim=True)  # [B, 1, T, D]
        support_side = self._refine(torch.cat([anchors, support], dim=1))
        query_side = self._refine(torch.cat([global_anchor, query], dim=1))
        refined_anchors, refined_support = support_side[:, :n_way], support_side[:, n_way:]
        refined_global, refined_query = query_side[:, :1], query_side[:, 1:]
        return otam_distance(
            refined_query, episode.class_means(refined_support), lam=self.lam
        ) + otam_distance(refined_global, refined_anchors, lam=self.lam)


class ClassMeanOTAM(nn.Module):
    """PADM switched off: `D2 = OTAM_bi(class means of s, q)` on the unrefined features."""

    def forward(self, episode: Episode, support: Tensor, query: Tensor) -> Tensor:
        return otam_distance(query, episode.class_means(support))
