"""HoliTom building blocks (tokenprune.strategies.holitom) on hand-built inputs with known answers."""
from __future__ import annotations

import itertools

import pytest
import torch

from tokenprune.strategies.holitom import (
    allocate,
    dpc_knn,
    frame_similarity,
    holitom_outer,
    merge_clusters,
    merge_into_kept,
    segment_windows,
)


def _video(seed: int = 0, frames: int = 6, pos: int = 4, dim: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, pos, dim, generator=g)


def test_segmentation_finds_the_static_blocks():
    x = _video()
    x[1:3, :2] = x[0, :2]          # frames 0-2: positions 0, 1 identical
    x[4:6] = x[3]                  # frames 3-5: everything identical
    segments, reduced = segment_windows(frame_similarity(x), tau=0.8)
    assert segments == [(0, 2), (3, 5)]
    assert reduced == 2 * 2 + 4 * 2


def _gain(sim, tau, s, e):
    return int((sim[s:e] > tau).all(0).sum()) * (e - s) if e > s else 0


@pytest.mark.parametrize("seed", range(5))
def test_dp_is_optimal_against_brute_force(seed):
    x = _video(seed, frames=7, pos=5)
    g = torch.Generator().manual_seed(100 + seed)
    for f in range(1, 7):          # random runs of repeated positions
        same = torch.rand(5, generator=g) < 0.6
        x[f, same] = x[f - 1, same]
    sim = frame_similarity(x)
    segments, reduced = segment_windows(sim, tau=0.8)
    best = 0
    for cuts in itertools.product([0, 1], repeat=6):
        bounds, start = [], 0
        for i, c in enumerate(cuts):
            if c:
                bounds.append((start, i))
                start = i + 1
        bounds.append((start, 6))
        best = max(best, sum(_gain(sim, 0.8, s, e) for s, e in bounds))
    assert reduced == best == sum(_gain(sim, 0.8, s, e) for s, e in segments)
    assert segments[0][0] == 0 and segments[-1][1] == 6
    assert all(b[0] == a[1] + 1 for a, b in zip(segments, segments[1:]))
    assert segment_windows(sim, tau=0.8, max_window=1)[0] == [(i, i) for i in range(7)]


def test_dpc_knn_finds_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    centres_true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(5, 2, generator=g) for c in centres_true])
    centres, assign = dpc_knn(x, 3, k=3)
    assert centres.tolist() == sorted(centres.tolist()) and len(set((centres // 5).tolist())) == 3
    assert torch.equal(assign, torch.arange(15) // 5)            # every point joins its own blob
    again = dpc_knn(x, 3, k=3)
    assert torch.equal(again[0], centres) and torch.equal(again[1], assign)
    c_all, a_all = dpc_knn(x[:2], 5)                             # more clusters than points: all kept
    assert c_all.tolist() == [0, 1] and a_all.tolist() == [0, 1]


def test_merge_clusters_weights():
    x = torch.tensor([[0.0], [1.0], [3.0], [8.0]])
    centres, assign = torch.tensor([0, 3]), torch.tensor([0, 0, 0, 1])
    torch.testing.assert_close(merge_clusters(x, centres, assign), torch.tensor([[0.6 * 0 + 0.4 * 2.0], [8.0]]))
    torch.testing.assert_close(merge_clusters(x, centres, assign, beta=None), torch.tensor([[4 / 3], [8.0]]))


def test_allocate_is_exact_and_capped():
    for sizes, total in [([5, 3, 0, 7], 6), ([1, 1, 1], 2), ([4, 4], 100), ([10, 1, 1], 3)]:
        out = allocate(sizes, total)
        assert sum(out) == min(total, sum(sizes)) and all(0 <= o <= s for o, s in zip(out, sizes))


@pytest.mark.parametrize("n_keep", [1, 5, 9, 13, 24, 30])
def test_outer_stage_exact_budget_and_static_merge(n_keep):
    x = _video(3)
    x[1:3, :2] = x[0, :2]
    x[4:6] = x[3]
    scores = torch.rand(6, 4, generator=torch.Generator().manual_seed(1))
    sel = holitom_outer(x, scores, n_keep)
    # the pool after temporal merging: 24 tokens - 12 removable (static positions kept once)
    assert sel.features.shape == (min(n_keep, 12), 8) and sel.segments == [(0, 2), (3, 5)]
    pairs = list(zip(sel.frames.tolist(), sel.positions.tolist()))
    assert len(set(pairs)) == len(pairs)
    again = holitom_outer(x, scores, n_keep)
    assert torch.equal(again.features, sel.features) and torch.equal(again.positions, sel.positions)


def test_outer_stage_static_tokens_stand_for_their_window():
    x = _video(4, frames=3, pos=4)
    x[1:] = x[0]                                    # everything static: one window of 3 frames
    sel = holitom_outer(x, torch.rand(3, 4), n_keep=4)
    assert sel.segments == [(0, 2)] and sel.frames.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(sel.features, x[0])  # four clusters of one point: the averaged frame


def _sequential_reference(hidden, keep):
    h = hidden.clone()
    kept = h[keep].clone()
    kn = torch.nn.functional.normalize(kept, dim=-1)
    for i in range(hidden.shape[0]):
        if i in keep.tolist():
            continue
        j = int((torch.nn.functional.normalize(h[i], dim=-1) @ kn.T).argmax())
        kept[j] = (kept[j] + h[i]) / 2
    return kept


def test_inner_merge_reproduces_the_sequential_average_and_offers_the_mean():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 6, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 4, 9, 15])
    torch.testing.assert_close(merge_into_kept(hidden, keep), _sequential_reference(hidden, keep))
    mean = merge_into_kept(hidden, keep, weighting="mean")
    target = (torch.nn.functional.normalize(hidden, dim=-1) @ torch.nn.functional.normalize(hidden[keep], dim=-1).T).argmax(-1)
    target[keep] = torch.arange(4)
    for j in range(4):
        torch.testing.assert_close(mean[j], hidden[target == j].mean(0))
    assert torch.equal(merge_into_kept(hidden, torch.arange(20)), hidden)
    with pytest.raises(ValueError):
        merge_into_kept(hidden, keep, weighting="bogus")


def test_static_clusters_use_the_official_neighbourhood_k_min_of_K_and_clusters():
    """A window whose static positions get fewer clusters than K (= 7) scores density over
    k = min(K, clusters) neighbours, as the official caller passes it (not min(K, points))."""
    from tokenprune.strategies.holitom import DPC_K

    x = _video(5, frames=2, pos=16)
    x[1] = x[0]                                     # one window of 2 frames, every position static
    sel = holitom_outer(x, torch.rand(2, 16), n_keep=3)
    static = x[0:2].float().mean(0).to(x.dtype)
    official, _ = dpc_knn(static, 3, min(DPC_K, 3))
    assert sel.segments == [(0, 1)] and torch.equal(sel.positions.sort().values, official.sort().values)
    # the case discriminates: density over min(K, points) = 7 neighbours picks other centres here
    other, _ = dpc_knn(static, 3, min(DPC_K, 16))
    assert not torch.equal(official, other)
