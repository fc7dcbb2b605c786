"""Unit tests of the pure strategy functions on hand-made tensors."""
from __future__ import annotations

import math

import pytest
import torch

from tokenprune.attention import last_row_attention, vision_reductions
from tokenprune.strategies.base import topk_indices
from tokenprune.strategies.baselines import pool_cells, pool_select, random_select
from tokenprune.strategies.fastv import fastv_select
from tokenprune.strategies.fopru import fopru_rank, fopru_row
from tokenprune.strategies.hiprune import cross_neighbours, default_object_layer, hiprune_select
from tokenprune.strategies.visionzip import VisionZipConfig, visionzip_select


# --- HiPrune -------------------------------------------------------------------------------------
def test_cross_neighbours_clamp_and_wrap_like_the_official_code():
    # 4x4 grid; index 0 (top-left): -1 and -4 clamp to 0 -> {0, 1, 4}
    assert cross_neighbours(torch.tensor([0]), 16, 4).tolist() == [0, 1, 4]
    # index 3 (top-right): +1 wraps to the next row's first token (flat index), -4 clamps to 0
    assert cross_neighbours(torch.tensor([3]), 16, 4).tolist() == [0, 2, 3, 4, 7]
    # index 15 (bottom-right): +1 and +4 clamp to 15
    assert cross_neighbours(torch.tensor([15]), 16, 4).tolist() == [11, 14, 15]


@pytest.mark.parametrize("n,alpha,anchors", [(64, 0.1, 1), (128, 0.1, 3), (192, 0.1, 4), (25, 0.1, 0),
                                             (75, 0.1, 2), (125, 0.1, 2)])
def test_anchor_count_uses_python_rounding(n, alpha, anchors):
    assert round(n * alpha / 5) == anchors  # 0.5 -> 0 and 2.5 -> 2 (banker's), as the official code
    score_obj = torch.zeros(576)
    score_obj[300] = 1.0  # one clear anchor (when any)
    score_obj[100] = 0.9
    score_obj[500] = 0.8
    score_obj[200] = 0.7
    deep = torch.rand(576, generator=torch.Generator().manual_seed(0)) * 0.01
    kept = hiprune_select(score_obj, deep, n, 24, alpha)
    assert kept.numel() == n and torch.equal(kept, torch.unique(kept))
    if anchors:
        assert {299, 300, 301, 276, 324} <= set(kept.tolist())


def official_llava_hiprune(score_obj, score_deep, n, width, alpha):
    """The official LLaVA rule (deep score -= 1 at chosen tokens), written from algorithms.md §1.4."""
    a = torch.topk(score_obj, round(n * alpha / 5)).indices
    ab = torch.unique(torch.cat([a, a - 1, a + 1, a - width, a + width]).clamp(0, score_obj.numel() - 1))
    deep = score_deep.clone()
    deep[ab] -= 1
    r = torch.topk(deep, n - ab.numel()).indices
    return torch.sort(torch.cat([ab, r])).values


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [64, 128, 192])
def test_same_token_set_as_official_llava_rule(seed, n):
    g = torch.Generator().manual_seed(seed)
    obj = torch.softmax(torch.randn(576, generator=g) * 3, 0)
    deep = torch.softmax(torch.randn(576, generator=g) * 3, 0)
    assert torch.equal(hiprune_select(obj, deep, n, 24, 0.1), official_llava_hiprune(obj, deep, n, 24, 0.1))


def test_chosen_tokens_never_selected_twice_even_with_summed_scores():
    # summed (Qwen-style) scores exceed 1: the official "-1" masking could pick an anchor again
    obj = torch.zeros(16)
    obj[5] = 1.0
    deep = torch.zeros(16)
    deep[5] = 10.0
    kept = hiprune_select(obj, deep, 8, 4, 1.0)
    assert kept.numel() == 8 and torch.unique(kept).numel() == 8


def test_overflowing_anchor_buffer_keeps_anchors_and_best_buffers():
    obj = torch.zeros(16)
    obj[5] = 1.0
    deep = torch.arange(16.0)
    kept = hiprune_select(obj, deep, 3, 4, 1.0)  # 1 anchor + 4 buffers > 3
    assert kept.tolist() == [5, 6, 9]  # anchor 5, then buffers {1, 4, 6, 9} by deep score: 9, 6


def test_default_object_layer_scales_with_depth():
    assert default_object_layer(24) == 9
    assert default_object_layer(12) == round(4.5) == 4
    assert default_object_layer(1) == 1


# --- FoPru ---------------------------------------------------------------------------------------
def test_fopru_rank_ties_break_by_lower_index():
    sig = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0])
    assert fopru_rank(sig, 2).tolist() == [1, 2]


def test_fopru_row_with_budget_not_a_multiple_of_width():
    sig = torch.tensor([[0.1, 0.1, 0.1, 0.1],
                        [0.9, 0.8, 0.7, 0.6],   # best row (3.0)
                        [0.0, 0.5, 0.9, 0.2],   # second row (1.6)
                        [0.3, 0.3, 0.3, 0.3]]).flatten()
    assert fopru_row(sig, 4, (4, 4)).tolist() == [4, 5, 6, 7]
    assert fopru_row(sig, 6, (4, 4)).tolist() == [4, 5, 6, 7, 9, 10]   # + 2 best of row 2
    assert fopru_row(sig, 3, (4, 4)).tolist() == [4, 5, 6]
    assert fopru_row(sig, 16, (4, 4)).tolist() == list(range(16))


# --- VisionZip -----------------------------------------------------------------------------------
def test_visionzip_merging_weights():
    cls = torch.tensor([0.0, 9.0, 0.0, 0.0, 8.0, 0.0])  # dominant: 1 and 4
    keys = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0, 1.0], [1, 1], [0.1, 1]])
    feats = torch.arange(6.0)[:, None].repeat(1, 2)
    sel = visionzip_select(cls, keys, feats, 2, 2)
    # rest = [0, 2, 3, 5]; stride 4 // 2 = 2 -> targets 0 and 3; members 2 (-> 0), 5 (-> 3)
    assert sel.indices.tolist() == [0, 1, 3, 4]
    expected = torch.tensor([0 + 2.0, 1.0, 3 + 5.0, 4.0])
    assert torch.equal(sel.features[:, 0], expected)


def test_visionzip_target_without_members_is_itself_and_split():
    cls = torch.arange(6.0)
    sel = visionzip_select(cls, torch.eye(6), torch.arange(6.0)[:, None], 4, 2)
    assert sel.indices.tolist() == [0, 1, 2, 3, 4, 5] and torch.equal(sel.features[:, 0], torch.arange(6.0))
    assert VisionZipConfig(budget=64).split(64) == (54, 10)
    assert VisionZipConfig(budget=128).split(128) == (108, 20)
    assert VisionZipConfig(budget=192).split(192) == (162, 30)
    assert VisionZipConfig(keep=0.5, contextual=3).split(20) == (17, 3)


# --- FastV, random, pool -------------------------------------------------------------------------
def test_fastv_select_and_ties():
    assert fastv_select(torch.tensor([0.1, 0.5, 0.5, 0.2]), 2).tolist() == [1, 2]
    assert topk_indices(torch.ones(5), 3).tolist() == [0, 1, 2]


def test_random_is_seeded_sorted_unique():
    a, b = random_select(64, 10, 3), random_select(64, 10, 3)
    assert torch.equal(a, b) and torch.equal(a, torch.unique(a)) and a.numel() == 10
    assert not torch.equal(a, random_select(64, 10, 4))


@pytest.mark.parametrize("grid", [(8, 8), (24, 24), (5, 7), (3, 11)])
def test_pool_cells_meet_every_budget_exactly(grid):
    h, w = grid
    for n in range(1, h * w + 1):
        cells = pool_cells(grid, n)
        assert len(cells) == n
        sel = pool_select(torch.randn(h * w, 3), grid, n)
        assert torch.equal(sel.indices, torch.unique(sel.indices))


def test_pool_equals_adaptive_avg_pool_for_regular_budgets():
    feats = torch.randn(24 * 24, 5)
    for oh in (2, 3, 8, 12):
        sel = pool_select(feats, (24, 24), oh * oh)
        ref = torch.nn.functional.adaptive_avg_pool2d(feats.T.reshape(1, 5, 24, 24), oh).reshape(5, -1).T
        torch.testing.assert_close(sel.features, ref)
    sel = pool_select(feats, (24, 24), 16)
    assert sel.indices.tolist()[:4] == [2 * 24 + 2, 2 * 24 + 8, 2 * 24 + 14, 2 * 24 + 20]  # cell centres


# --- attention reductions -------------------------------------------------------------------------
def test_vision_reductions_match_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 12, generator=g), torch.randn(2, 10, 12, generator=g)
    p = torch.softmax(q.reshape(2, 10, 3, 4).transpose(1, 2) @ k.reshape(2, 10, 3, 4).transpose(1, 2).transpose(-1, -2) * 0.5, -1)
    out = vision_reductions(q, k, 3, 0.5, {"cls", "mean", "keys"}, chunk_rows=3)
    torch.testing.assert_close(out["mean"], p.mean(1).mean(1))
    torch.testing.assert_close(out["cls"], p.mean(1)[:, 0])
    torch.testing.assert_close(out["keys"], k.reshape(2, 10, 3, 4).mean(2))


@pytest.mark.parametrize("block", [7, 30, 40 * 3 * 10, 10**6])   # < one row; rows; whole samples; the batch
def test_vision_reductions_blocks_agree(monkeypatch, block):
    """Every block shape (a few rows of one sample ... several whole samples) sums the same received
    attention; a block never holds more than the device's block size of softmax entries."""
    import tokenprune.attention as att

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(5, 40, 12, generator=g), torch.randn(5, 40, 12, generator=g)
    ref = vision_reductions(q, k, 3, 0.5, {"mean"}, chunk_rows=1)["mean"]
    monkeypatch.setitem(att.BLOCK_FLOATS, "cpu", block)
    samples, rows = att._blocks(5, 3, 40, q.device, None)
    assert samples * 3 * rows * 40 <= max(block, 3 * 40)    # one row of one sample is the smallest block
    assert (samples > 1) == (block >= 2 * 3 * 40 * 40)
    torch.testing.assert_close(vision_reductions(q, k, 3, 0.5, {"mean"})["mean"], ref, rtol=1e-6, atol=1e-7)


def test_last_row_attention_handles_gqa_and_masking():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    valid = torch.tensor([[False, True, True, True, True, True]])
    row = last_row_attention(q, k, 8 ** -0.5, valid)
    kr = k.repeat_interleave(2, dim=1)
    logits = (q @ kr.transpose(-1, -2))[..., 0, :] * 8 ** -0.5
    logits[..., 0] = -math.inf
    torch.testing.assert_close(row, torch.softmax(logits, -1).mean(1))
    assert row[0, 0] == 0


@pytest.mark.parametrize("merger", ["visionzip", "pool"])
def test_merge_groups_describe_the_merged_features(merger):
    """Every token is carried by one kept token (``groups``); a kept token carries itself; pooled
    features are the mean of their cell, VisionZip contextual ones target + mean of members."""
    g = torch.Generator().manual_seed(0)
    n, d, keep = 64, 8, 12
    feats = torch.randn(n, d, generator=g)
    if merger == "pool":
        sel = pool_select(feats, (8, 8), keep)
    else:
        sel = visionzip_select(torch.rand(n, generator=g), torch.randn(n, 4, generator=g), feats, 9, 3)
    groups = sel.groups
    assert groups.shape == (n,) and int(groups.min()) >= 0 and int(groups.max()) == keep - 1
    assert torch.equal(groups[sel.indices], torch.arange(keep))            # kept tokens carry themselves
    for k in range(keep):
        members = torch.nonzero(groups == k).flatten()
        if merger == "pool":  # adaptive-pooling cells may overlap: a token is drawn in one of its cells
            r0, r1, c0, c1 = pool_cells((8, 8), keep)[k]
            cell = (torch.arange(r0, r1)[:, None] * 8 + torch.arange(c0, c1)[None]).flatten()
            torch.testing.assert_close(sel.features[k], feats[cell].mean(0))
            assert set(members.tolist()) <= set(cell.tolist())
        elif members.numel() > 1:  # contextual target: own feature + mean of the others
            others = members[members != sel.indices[k]]
            torch.testing.assert_close(sel.features[k], feats[sel.indices[k]] + feats[others].mean(0))
        else:
            torch.testing.assert_close(sel.features[k], feats[sel.indices[k]])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("grid,n_keep,alpha", [((8, 8), 16, 0.1), ((8, 8), 5, 0.9), ((6, 10), 30, 0.5),
                                               ((4, 4), 3, 1.0), ((1, 12), 6, 0.8), ((24, 24), 64, 0.1)])
def test_hiprune_batched_selection_equals_per_image(seed, grid, n_keep, alpha):
    from tokenprune.strategies.hiprune import hiprune_select_batch

    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    obj = torch.rand(5, n, generator=g)
    deep = torch.rand(5, n, generator=g)
    deep[0, :4] = deep[0, 4]            # ties are broken like the per-image path
    obj[1] = 0.5
    batched = hiprune_select_batch(obj, deep, n_keep, grid[1], alpha)
    for i in range(5):
        assert torch.equal(batched[i], hiprune_select(obj[i], deep[i], n_keep, grid[1], alpha)), i


def test_fopru_rank_batched_selection_equals_per_image():
    from tokenprune.strategies.fopru import fopru_rank_batch

    g = torch.Generator().manual_seed(0)
    sig = torch.rand(4, 64, generator=g)
    sig[2, :10] = 0.3
    out = fopru_rank_batch(sig, 12)
    for i in range(4):
        assert torch.equal(out[i], fopru_rank(sig[i], 12))


@pytest.mark.parametrize("n,nd,nc", [(64, 9, 3), (64, 20, 0), (64, 60, 10), (48, 10, 38), (48, 0, 12)])
def test_visionzip_batched_selection_equals_per_image(n, nd, nc):
    from tokenprune.strategies.visionzip import visionzip_select_batch

    g = torch.Generator().manual_seed(n + nd + nc)
    cls = torch.rand(3, n, generator=g)
    cls[1, :5] = 0.7                                   # ties
    keys = torch.randn(3, n, 4, generator=g)
    feats = torch.randn(3, n, 8, generator=g)
    batched = visionzip_select_batch(cls, keys, feats, nd, nc)
    for i in range(3):
        ref = visionzip_select(cls[i], keys[i], feats[i], nd, nc)
        assert torch.equal(batched[i].indices, ref.indices)
        if ref.features is None:
            assert batched[i].features is None
        else:
            torch.testing.assert_close(batched[i].features, ref.features)
            assert torch.equal(batched[i].groups, ref.groups)
