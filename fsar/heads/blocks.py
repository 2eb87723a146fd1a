"""Building blocks shared by the heads (SPEC 5.1).

Official key names of these blocks are mapped in `fsar.heads.reference`; the attribute names here
are fsar's own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "COS_SIM_EPS",
    "cos_sim",
    "Dropout",
    "FeedForward",
    "Attention",
    "TransformerLayer",
    "Gate",
    "MotionModule",
]

# The releases put one epsilon on the product of the two norms (not on each norm).
COS_SIM_EPS = 0.01


def cos_sim(x: Tensor, y: Tensor, eps: float = COS_SIM_EPS) -> Tensor:
    """Cosine similarity of the last dimension, as in the releases.

    x [..., M, D], y [..., N, D] (leading dims broadcast) -> [..., M, N] with
    `x y^T / (|x| |y|^T + eps)`.
    """
    numerator = x @ y.transpose(-1, -2)
    x_norm = x.norm(dim=-1, keepdim=True)  # [..., M, 1]
    y_norm = y.norm(dim=-1, keepdim=True)  # [..., N, 1]
    return numerator / (x_norm @ y_norm.transpose(-1, -2) + eps)


class Dropout(nn.Dropout):
    """`nn.Dropout` whose CPU masks come from 16-bit random integers.

    On CPU, `F.dropout` draws one Bernoulli float per element, which made dropout about a fifth
    of a CLIP-SPM training step on cached features (profiled on a 2-core VM). Here one 64-bit
    random word gives four 16-bit uniforms; forward + backward is 2.4x faster
    (`benchmarks/heads.py`, `cpu_kernels`).
    The drop probability is rounded to a multiple of 2**-16 (off by at most 7.6e-6) and the
    kept values are scaled by the inverse of the rounded keep probability, so `E[out] = x`
    exactly. Other devices (and eval mode) use `F.dropout` unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        dropped = round(self.p * 65536)  # of 65536 equally likely 16-bit values
        if not self.training or x.device.type != "cpu" or not 0 < dropped < 65536:
            return F.dropout(x, self.p, self.training, self.inplace)
        n = x.numel()
        # randint = empty + random_, but out of place: torch.compile traces it
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), device=x.device)
        uniform16 = words.view(torch.int16)[:n].view(x.shape)
        threshold = dropped - 32768  # int16 covers -32768..32767; keep uniform16 >= threshold
        scale = 65536 / (65536 - dropped)
        # The mask in arithmetic rather than `(uniform16 >= threshold) * scale`: CPU bool-to-float
        # promotion is not vectorised (about 4x slower here). On the integers, u - threshold + 1
        # is >= 1 where kept and <= 0 where dropped, so the clamp gives exactly scale or 0.
        mask = uniform16.to(x.dtype).sub_(threshold - 1).mul_(scale).clamp_(0.0, scale)
        return x * mask


class FeedForward(nn.Module):
    """Linear(dim -> hidden), GELU, Dropout, Linear(hidden -> dim), Dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections dim -> heads*dim_head.

    The output projection (with bias) is followed by dropout; the attention weights themselves
    are not dropped (as in the releases).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.drop = Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        # [N, L, h*dh] -> [N, h, L, dh]
        return x.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [N, Lq, dim], k and v [N, Lk, dim] -> [N, Lq, dim]."""
        out = F.scaled_dot_product_attention(
            self._split(self.to_q(q)), self._split(self.to_k(k)), self._split(self.to_v(v))
        )  # softmax(q k^T * dim_head^-0.5) v: [N, h, Lq, dh]
        out = out.transpose(1, 2).flatten(2)  # [N, Lq, h*dh]
        return self.drop(self.to_out(out))


class TransformerLayer(nn.Module):
    """PreNorm cross-attention layer `TX(q, k, v)` of the releases.

    One LayerNorm is shared by q, k and v; the attention result is added to the raw q, then an
    FFN with its own residual. Called with q only, it is self-attention.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        attn_dropout: float = 0.2,
        ffn_dropout: float = 0.05,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, attn_dropout)
        self.ffn = FeedForward(dim, mlp_dim, ffn_dropout)

    def forward(self, q: Tensor, k: Tensor | None = None, v: Tensor | None = None) -> Tensor:
        """q [N, Lq, dim]; k, v [N, Lk, dim] (default: q) -> [N, Lq, dim]."""
        nq = self.norm(q)
        nk = nq if k is None else self.norm(k)
        nv = nk if v is None else self.norm(v)
        x = self.attn(nq, nk, nv) + q
        return self.ffn(x) + x


class Gate(nn.Module):
    """`g(x) = sigmoid(W2 leaky_relu(W1 x, slope))` with hidden width int(ratio * dim)."""

    def __init__(self, dim: int, ratio: float, negative_slope: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.LeakyReLU(negative_slope)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.fc2(self.act(self.fc1(x))))


def _motion_tables(frames: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """`_build_motion_tables`, cached in eager mode (torch.compile bakes them in as constants)."""
    if torch.compiler.is_compiling():  # dynamo would trace through the cache wrapper, warning
        return _build_motion_tables(frames, dtype, device)
    return _cached_motion_tables(frames, dtype, device)


def _build_motion_tables(
    frames: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Time weights of `MotionModule` for T = frames: (sums [10, T], ones_per_k [3]).

    Rows 3k+j of `sums` give `X[k, j] = sum_r sums[3k+j, r] x[r]`; row 9 is `w` itself (see
    `MotionModule`); `ones_per_k[k] = sum_s u_k[s]` carries conv1's bias.
    """
    # Plain Python numbers (float64), so that torch.compile traces constants, not .item() calls.
    # w_s = 0.5 n_s / (T-1): frame s is in n_s of the T-1 consecutive pairs (1 at the ends)
    w = [(0.5 if s in (0, frames - 1) else 1.0) / (frames - 1) for s in range(frames)]

    def weight(index: int) -> float:
        return w[index] if 0 <= index < frames else 0.0

    # u_k[s] = w[s - k + 1]: conv2's tap k reads h[s] for output frame s - k + 1 (h zero-padded)
    u = [[weight(s - k + 1) for s in range(frames)] for k in range(3)]
    sums = [[0.0] * frames for _ in range(10)]
    for k in range(3):
        for j in range(3):  # conv1's tap j reads x[s + j - 1] (x zero-padded)
            for s in range(frames):
                if 0 <= s + j - 1 < frames:
                    sums[3 * k + j][s + j - 1] += u[k][s]
    sums[9] = w
    ones_per_k = [sum(row) for row in u]
    return (
        torch.tensor(sums, dtype=dtype, device=device),
        torch.tensor(ones_per_k, dtype=dtype, device=device),
    )


_cached_motion_tables = functools.lru_cache(maxsize=32)(_build_motion_tables)


class MotionModule(nn.Module):
    """Motion vector of a frame sequence (CLIP-SPM `M`).

    `c = conv2(conv1(x))` (Conv1d dim -> dim, kernel 3, padding 1, along time, no activation);
    `m[t] = 0.5 * ((c[t+1] - x[t]) + (c[t] - x[t+1]))` for t < T-1; result = mean over t.

    Computed in closed form. The mean over t is `sum_s w_s (c[s] - x[s])` with `w_s = 0.5 n_s /
    (T-1)` (n_s = 1 for the end frames, 2 inside; the weights sum to 1), and both convolutions
    are linear, so the weighted time sum passes through them: `sum_s w_s c[s] = b2 + sum_k W2_k
    H_k`, `H_k = U_k b1 + sum_j W1_j X_kj`, where each `X_kj` is a fixed weighted time sum of x
    (`_motion_tables`). The matrix products then run on [V, 3D] rows instead of [V*T, 3D]
    (T times fewer), with no shifted copies of the frames: the motion branch was about an eighth
    of a CLIP-SPM training step on cached features. Equal to the direct form up to float
    rounding (`tests/test_heads_contract.py`, the golden files).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., T, D] with T >= 2 -> [..., D]."""
        lead, (frames, dim) = x.shape[:-2], x.shape[-2:]
        videos = x.reshape(-1, frames, dim)  # [V, T, D]
        sums, ones_per_k = _motion_tables(frames, x.dtype, x.device)
        weighted = torch.matmul(sums, videos)  # [V, 10, D]
        # [out, in, tap] -> [(tap, in), out], matching the (j, d) / (k, d) flattening below
        w1 = self.conv1.weight.permute(2, 1, 0).reshape(3 * dim, -1)
        w2 = self.conv2.weight.permute(2, 1, 0).reshape(3 * dim, -1)
        h = weighted[:, :9].reshape(-1, 3, 3 * dim) @ w1 + ones_per_k[:, None] * self.conv1.bias
        motion = torch.addmm(self.conv2.bias, h.flatten(1), w2) - weighted[:, 9]  # [V, D]
        return motion.reshape(*lead, motion.shape[-1])


# Official names inside one release Transformer_v1 (depth 1) -> TransformerLayer, for the
# `OfficialKeys` of the heads built on it (official inner prefix, fsar inner prefix).
TRANSFORMER_KEYS = (
    ("layers.0.0.norm.", "norm."),
    ("layers.0.0.fn.to_q.", "attn.to_q."),
    ("layers.0.0.fn.to_k.", "attn.to_k."),
    ("layers.0.0.fn.to_v.", "attn.to_v."),
    ("layers.0.0.fn.to_out.0.", "attn.to_out."),
    ("layers.0.1.net.0.", "ffn.fc1."),
    ("layers.0.1.net.3.", "ffn.fc2."),
)
# Official Sequential(Linear, LeakyReLU, Linear, ...) gate -> Gate.
GATE_KEYS = (("0.", "fc1."), ("2.", "fc2."))
