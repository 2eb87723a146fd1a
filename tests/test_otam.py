"""OTAM: golden arrays, a cell-by-cell reference of SPEC 5.1, batching and gradcheck."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fsar.heads import cos_sim, frame_distances, otam_bidirectional, otam_distance, otam_one_way

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
GOLDEN_FILES = sorted(GOLDEN.glob("clipspm_*.npz"))


def reference_one_way(d: torch.Tensor, lam: float = 0.5) -> float:
    """SPEC 5.1 written cell by cell for one [Tq, Ts] matrix (plain Python floats)."""
    tq, ts = d.shape
    dp = [[0.0] + [float(x) for x in row] + [0.0] for row in d]
    c = [[0.0] * (ts + 2) for _ in range(tq)]

    def softmin(*xs):
        return -lam * math.log(sum(math.exp(-x / lam) for x in xs))

    for m in range(1, ts + 2):
        c[0][m] = dp[0][m] + c[0][m - 1]
    for l in range(1, tq):
        c[l][1] = dp[l][1] + softmin(c[l - 1][0], c[l - 1][1], c[l][0])
        for m in range(2, ts + 1):
            c[l][m] = dp[l][m] + softmin(c[l - 1][m - 1], c[l][m - 1])
        c[l][ts + 1] = softmin(c[l - 1][ts], c[l - 1][ts + 1], c[l][ts])
    return c[tq - 1][ts + 1]


@pytest.mark.skipif(not GOLDEN_FILES, reason="golden vectors not found")
@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_otam_matches_official_arrays(path):
    with np.load(path) as z:
        g = {k: torch.from_numpy(z[k]) for k in z.files}
    torch.testing.assert_close(
        otam_one_way(g["otam.one_way_input"]), g["otam.one_way_distance"], rtol=1e-5, atol=1e-5
    )
    support, query = g["input.support_features"], g["input.query_features"]
    labels = g["input.support_labels"].long()
    n_way = int(labels.max()) + 1
    prototypes = torch.stack([support[labels == c].mean(0) for c in range(n_way)])
    torch.testing.assert_close(prototypes, g["otam.prototypes"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        otam_distance(query[None], prototypes[None])[0],
        g["otam.bidirectional_distance"],
        rtol=1e-5,
        atol=1e-5,
    )
    flat_q, flat_s = query.reshape(-1, query.shape[-1]), support.reshape(-1, support.shape[-1])
    torch.testing.assert_close(
        cos_sim(flat_q, flat_s), g["cos_sim.query_x_support"], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("tq,ts", [(1, 1), (1, 5), (5, 1), (2, 2), (4, 7), (8, 8), (9, 3)])
def test_otam_equals_the_cell_by_cell_recurrence(tq, ts):
    g = torch.Generator().manual_seed(tq * 31 + ts)
    d = torch.rand(3, 2, tq, ts, generator=g, dtype=torch.float64) * 2
    out = otam_one_way(d)
    assert out.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert out[i, j].item() == pytest.approx(
                reference_one_way(d[i, j]), rel=1e-12, abs=1e-12
            )
    both = otam_bidirectional(d)
    expected = otam_one_way(d) + otam_one_way(d.transpose(-1, -2))
    torch.testing.assert_close(both, expected)


def test_otam_of_a_batch_equals_otam_of_each_pair():
    g = torch.Generator().manual_seed(0)
    query, protos = torch.randn(3, 4, 6, 16, generator=g), torch.randn(3, 5, 6, 16, generator=g)
    batched = otam_distance(query, protos)
    for b in range(3):
        for q in range(4):
            single = otam_distance(query[b, q][None, None], protos[b][None])[0, 0]
            torch.testing.assert_close(batched[b, q], single, rtol=1e-5, atol=1e-5)


def test_frame_distances_layout_is_query_prototype_frame_frame():
    g = torch.Generator().manual_seed(1)
    query, protos = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 5, 6, 8, generator=g)
    d = frame_distances(query, protos)
    assert d.shape == (2, 3, 5, 4, 6)
    torch.testing.assert_close(d[1, 2, 4], 1 - cos_sim(query[1, 2], protos[1, 4]))


@pytest.mark.parametrize("tq,ts", [(1, 1), (1, 3), (3, 1), (2, 2), (5, 3)])
def test_otam_gradcheck_on_small_and_uneven_shapes(tq, ts):
    g = torch.Generator().manual_seed(tq * 7 + ts)
    d = (torch.rand(2, tq, ts, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(otam_one_way, (d,))


def test_otam_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    d = (torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(otam_one_way, (d,))
    square = (torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(otam_bidirectional, (square,))


def test_otam_distance_gradcheck_through_features_float64():
    g = torch.Generator().manual_seed(3)
    query = torch.randn(1, 2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(1, 3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(otam_distance, (query, protos))


def test_otam_is_finite_for_large_distances():
    d = torch.full((2, 8, 8), 200.0, requires_grad=True)
    out = otam_bidirectional(d)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(d.grad).all()


def test_fast_logaddexp_matches_torch_logaddexp():
    from fsar.heads.otam import _logaddexp

    torch.manual_seed(0)
    a = torch.randn(10000) * 30
    b = torch.randn(10000) * 30
    a[:100] = float("-inf")  # row -1 of the sweep
    b[100:200] = a[100:200]  # equal arguments
    exact = torch.logaddexp(a.double(), b.double())
    fast = _logaddexp(a.clone(), b).double()
    assert torch.equal(fast[:100], b[:100].double())
    assert torch.allclose(fast, exact, rtol=1e-6, atol=1e-6)


def naive_release_one_way(d: torch.Tensor, lam: float) -> torch.Tensor:
    """The CLIP-FSAR codebase's OTAM_cum_dist in the input dtype: the soft-min as written there,
    -lam * log(sum exp(-x / lam)) with no max-shift. d [..., Tq, Ts] -> [...]."""
    d = torch.nn.functional.pad(d, (1, 1))
    rows, width = d.shape[-2], d.shape[-1]
    c = [[None] * width for _ in range(rows)]
    zero = torch.zeros_like(d[..., 0, 0])

    def softmin(*xs):
        return -lam * torch.log(sum(torch.exp(-x / lam) for x in xs))

    c[0][0] = zero
    for m in range(1, width):
        c[0][m] = d[..., 0, m] + c[0][m - 1]
    for l in range(1, rows):
        c[l][0] = zero
        c[l][1] = d[..., l, 1] + softmin(c[l - 1][0], c[l - 1][1], c[l][0])
        for m in range(2, width - 1):
            c[l][m] = d[..., l, m] + softmin(c[l - 1][m - 1], c[l][m - 1])
        c[l][-1] = d[..., l, -1] + softmin(c[l - 1][-2], c[l - 1][-1], c[l][-2])
    return c[-1][-1]


def test_the_stable_otam_equals_the_releases_naive_soft_min_wherever_it_is_finite():
    """CNN_OTAM (lambda 0.1) computes the soft-min naively in float32: CLIP-like distances (small,
    correlated frames) give the same numbers; large distances (running sums past ~10) underflow it
    to +inf while fsar's log-sum-exp stays finite (what the float64 naive form gives)."""
    g = torch.Generator().manual_seed(0)
    close_frames = 0.05 + 0.35 * torch.rand(64, 8, 8, generator=g)  # 1 - cos of CLIP frames
    naive = naive_release_one_way(close_frames, 0.1)
    assert torch.isfinite(naive).all()
    torch.testing.assert_close(otam_one_way(close_frames, 0.1), naive, rtol=1e-5, atol=1e-5)

    unrelated = 1.6 + 0.4 * torch.rand(64, 8, 8, generator=g)  # opposed frames (1 - cos > 1.6)
    assert torch.isinf(naive_release_one_way(unrelated, 0.1)).all()  # the release's +inf
    stable = otam_one_way(unrelated, 0.1)
    assert torch.isfinite(stable).all()
    exact = naive_release_one_way(unrelated.double(), 0.1)  # float64 does not underflow here
    torch.testing.assert_close(stable.double(), exact, rtol=1e-5, atol=1e-5)
