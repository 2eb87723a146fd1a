"""OTAM: ordered temporal alignment with a soft-min relaxation (SPEC 5.1).

The dynamic programme runs over anti-diagonals of the padded cost matrix: every cell of one
anti-diagonal depends only on the two previous ones, so a whole anti-diagonal of every
(episode, query, prototype) pair is one tensor operation. The loop has Tq + Ts + 1 steps and no
Python loop over pairs. The backward pass is the matching reverse sweep over the soft-min weights
(as in soft-DTW), which is much cheaper than recording every step for autograd.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import cos_sim

__all__ = ["OTAM_LAMBDA", "otam_one_way", "otam_bidirectional", "frame_distances", "otam_distance"]

# Soft-min temperature of the releases (OTAM_cum_dist_v2).
OTAM_LAMBDA = 0.5


# Soft-min weights below e^_EXP_FLOOR are set to 0 in the backward sweep: negligible next to the
# weights that matter, and it keeps CPU exp() and products off the slow denormal path.
_EXP_FLOOR = -80.0


@functools.lru_cache(maxsize=64)
def _computed_cells(rows: int, width: int, device: torch.device) -> Tensor:
    """[K, rows, 1] bool over the anti-diagonals of a padded [rows, width] grid: True where the
    cell follows the recurrence (1 <= m <= width-1).

    Anti-diagonal k = 0..K-1 (K = rows + width - 1) holds the cells (l, m = k - l), l = 0..rows-1;
    the others (column 0, and positions outside the grid) hold 0.
    """
    k = torch.arange(rows + width - 1)[:, None]
    m = k - torch.arange(rows)[None, :]
    return ((m >= 1) & (m <= width - 1))[..., None].to(device)


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """`log(exp(a) + exp(b))` for `b` finite (a may be -inf), as `max + log(1 + exp(-|a - b|))`.

    Same accuracy as `torch.logaddexp` in float32 (log(1 + x) loses only x below float
    resolution of the result) and about 5x faster on CPU, where `torch.logaddexp` and
    `torch.log1p` are not vectorised; it was the largest part of the OTAM sweep. Works in place
    on a temporary, so it is for the sweep (no autograd), not for differentiable code.
    """
    return (a - b).abs_().neg_().exp_().add_(1.0).log_().add_(torch.maximum(a, b))


def _up_rows(k: int, rows: int, width: int) -> list[int]:
    """Rows l >= 1 of anti-diagonal k whose cell has an up-move (column m = 1 or width-1)."""
    return [l for l in (k - 1, k - width + 1) if 1 <= l < rows]


# The sweep is a torch custom operator (forward and backward each one opaque op, the backward
# registered as its gradient), not a Python autograd.Function: torch.compile then records one
# call instead of unrolling the Tq + Ts + 1 steps into hundreds of graph nodes, and eager and
# compiled runs execute the same kernels, so they give the same numbers.
# Costs are kept negated and in units of lambda (`-C / lam`), so a soft-min is a plain
# log-sum-exp of the predecessors. Buffers are laid out [anti-diagonal, row, pair] so every step
# works on contiguous rows of pairs.


@torch.library.custom_op("fsar::otam_sweep", mutates_args=())
def _otam_sweep(dists: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """Forward anti-diagonal sweep: dists [..., rows, cols] -> (cost [...], neg_cost, skew).

    neg_cost [K, rows+1, P] and skew [K, rows, P] (K anti-diagonals, P pairs) are what the
    backward sweep needs."""
    *lead, rows, cols = dists.shape
    width = cols + 2
    n_diag = rows + width - 1
    padded = F.pad(dists.reshape(-1, rows, cols), (1, 1)) / lam  # [P, rows, width]
    pairs = padded.shape[0]
    # skew[k, l, p] = padded[p, l, k - l]; positions outside the grid read other cells
    # of the same pair and are never used.
    skew = padded.as_strided((n_diag, rows, pairs), (1, width - 1, rows * width)).contiguous()
    # row slot 0 = row -1; cells off the recurrence (column 0: C = 0, and positions outside
    # the grid) stay 0
    neg_cost = dists.new_zeros(n_diag, rows + 1, pairs)
    neg_cost[:, 0] = float("-inf")
    for k in range(1, n_diag):
        lo, hi = max(0, k - width + 1), min(rows, k)  # rows l of the cells 1 <= m <= width-1
        prev2, prev1 = neg_cost[max(k - 2, 0)], neg_cost[k - 1]
        # diagonal (l-1, m-1) and left (l, m-1) moves; slot l of an anti-diagonal is row l-1
        soft = _logaddexp(prev2[lo:hi], prev1[lo + 1 : hi + 1])  # rows lo..hi-1: [hi-lo, P]
        for l in _up_rows(k, rows, width):  # the up move (l-1, m), in one or two rows only
            soft[l - lo] = _logaddexp(soft[l - lo], prev1[l])
        torch.sub(soft, skew[k, lo:hi], out=neg_cost[k, lo + 1 : hi + 1])
    return (-lam * neg_cost[n_diag - 1, rows]).reshape(lead), neg_cost, skew


@_otam_sweep.register_fake
def _(dists: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    *lead, rows, cols = dists.shape
    n_diag, pairs = rows + cols + 1, dists.numel() // (rows * cols)
    return (
        dists.new_empty(lead),
        dists.new_empty(n_diag, rows + 1, pairs),
        dists.new_empty(n_diag, rows, pairs),
    )


@torch.library.custom_op("fsar::otam_sweep_backward", mutates_args=())
def _otam_sweep_backward(grad_out: Tensor, neg_cost: Tensor, skew: Tensor) -> Tensor:
    """Reverse sweep of the soft-min weights: grad of cost [...] -> grad of dists [..., rows,
    cols]."""
    n_diag, slots, pairs = neg_cost.shape
    rows = slots - 1
    width = n_diag - rows + 1
    computed = _computed_cells(rows, width, neg_cost.device)
    # Soft-min weight of every cell (anti-diagonals 1..K-1; entry k-1 is anti-diagonal k) on
    # each predecessor, all at once: exp(pred - logsumexp). Cells that are not computed get
    # logsumexp = +inf, hence weight 0.
    soft = torch.where(computed[1:], neg_cost[1:, 1:] + skew[1:], float("inf"))

    def weights(pred: Tensor, lse: Tensor) -> Tensor:
        z = pred - lse
        unused = (z > _EXP_FLOOR).logical_not_()  # exactly 0 below the floor: no denormals
        return z.clamp_min_(_EXP_FLOOR).exp_().masked_fill_(unused, 0.0)  # [*, rows, P]

    # anti-diagonal 1 has no diagonal move (its only computed cell is in row 0)
    w_diag = weights(neg_cost[:-2, :-1], soft[1:])  # entry k-2 is anti-diagonal k
    w_left = weights(neg_cost[:-1, 1:], soft)

    # Up moves exist into columns m = 1 and m = width-1 only: the weight of cell (l, m) on its
    # up predecessor, l = 1..rows-1, reads neg_cost[k-1, slot l] and soft[k-1, row l] with
    # k = l + m, i.e. one diagonal line of each buffer.
    def line(buffer: Tensor, m: int) -> Tensor:  # buffer[l + m - 1, l] for l = 1..rows-1
        step = buffer.stride(0) + buffer.stride(1)
        start = buffer.storage_offset() + (m - 1) * buffer.stride(0) + step
        return buffer.as_strided((rows - 1, pairs), (step, 1), start)

    w_up = {m: weights(line(neg_cost, m), line(soft, m)) for m in {1, width - 1}}  # [rows-1, P]
    grad = neg_cost.new_empty(n_diag, rows, pairs)
    grad[n_diag - 1] = 0.0
    grad[n_diag - 1, rows - 1] = grad_out.reshape(pairs)
    for k in range(n_diag - 2, 0, -1):
        # successors of (l, m): left (l, m+1) and up (l+1, m) on k+1, diagonal (l+1, m+1) on k+2
        acc = grad[k + 1] * w_left[k]
        for m in (1, width - 1):  # the up successors (l+1, m), l+1 = k+1-m
            if 1 <= k + 1 - m < rows:
                acc[k - m].addcmul_(grad[k + 1, k + 1 - m], w_up[m][k - m])
        if k + 2 < n_diag:
            acc[:-1].addcmul_(grad[k + 2, 1:], w_diag[k, 1:])
        grad[k] = acc
    # d result / d dists[p, l, j] = grad of cell (l, j+1), stored at grad[l + j + 1, l, p]
    plane = rows * pairs
    grad_dists = grad.as_strided((pairs, rows, width - 2), (1, plane + pairs, plane), plane)
    # a fresh contiguous tensor, as the operator's fake kernel tells the compiler
    grad_dists = grad_dists.reshape(*grad_out.shape, rows, width - 2)
    return grad_dists.clone(memory_format=torch.contiguous_format)


@_otam_sweep_backward.register_fake
def _(grad_out: Tensor, neg_cost: Tensor, skew: Tensor) -> Tensor:
    n_diag, slots, _ = neg_cost.shape
    return grad_out.new_empty(*grad_out.shape, slots - 1, n_diag - slots)  # cols = K - rows - 1


def _save_sweep(ctx, inputs: tuple, output: tuple) -> None:
    # the buffers are outputs only so that they can be saved: no gradient flows into them, and
    # none is materialised for them
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2])


def _sweep_grad(ctx, grad_cost: Tensor | None, *_buffers) -> tuple[Tensor | None, None]:
    if grad_cost is None:
        return None, None
    neg_cost, skew = ctx.saved_tensors
    return torch.ops.fsar.otam_sweep_backward(grad_cost.contiguous(), neg_cost, skew), None


_otam_sweep.register_autograd(_sweep_grad, setup_context=_save_sweep)


def otam_one_way(dists: Tensor, lam: float = OTAM_LAMBDA) -> Tensor:
    """One-way OTAM of frame distances `dists [..., Tq, Ts]` -> `[...]`.

    The matrix is padded with one zero column left and right; `C` follows SPEC 5.1 with
    `softmin(a, ...) = -lam * log sum exp(-a / lam)`; the result is `C[Tq-1, Ts+1]`.
    Differentiable once (an analytic backward sweep); not twice.
    """
    return torch.ops.fsar.otam_sweep(dists, float(lam))[0]


def otam_bidirectional(dists: Tensor, lam: float = OTAM_LAMBDA) -> Tensor:
    """`otam_one_way(d) + otam_one_way(d^T)` for `dists [..., Tq, Ts]` -> `[...]`."""
    transposed = dists.transpose(-1, -2)
    if dists.shape[-1] == dists.shape[-2]:
        both = otam_one_way(torch.stack([dists, transposed]), lam)  # one sweep for both directions
        return both[0] + both[1]
    return otam_one_way(dists, lam) + otam_one_way(transposed, lam)


def frame_distances(query: Tensor, prototypes: Tensor) -> Tensor:
    """`1 - cos_sim` between all frames: query [B, Q, Tq, D], prototypes [B, N, Ts, D]
    -> [B, Q, N, Tq, Ts]."""
    b, q, tq, d = query.shape
    n, ts = prototypes.shape[1], prototypes.shape[2]
    sim = cos_sim(query.reshape(b, q * tq, d), prototypes.reshape(prototypes.shape[0], n * ts, d))
    return (1 - sim).reshape(b, q, tq, n, ts).transpose(2, 3)


def otam_distance(
    query: Tensor, prototypes: Tensor, bidirectional: bool = True, lam: float = OTAM_LAMBDA
) -> Tensor:
    """OTAM distance of every query to every prototype: [B, Q, T, D] x [B, N, T, D] -> [B, Q, N]."""
    dists = frame_distances(query, prototypes)
    return otam_bidirectional(dists, lam) if bidirectional else otam_one_way(dists, lam)
