"""VisPruner's pure functions: the selection rule against hand-worked cases and a slow list-based
re-implementation of the official loop, exact budgets, ties, batching, the config."""
from __future__ import annotations

import math

import pytest
import torch

from tokenprune.config import ConfigError
from tokenprune.strategies.base import ScoreRequest, VisionInfo, VisualTokens
from tokenprune.strategies.vispruner import SPEC, VisPrunerConfig, diverse_positions, vispruner_select, vispruner_select_batch

CLIP = VisionInfo(num_layers=24, feature_layer=22, grid=(4, 4), has_cls=True)
NO_CLS = VisionInfo(num_layers=27, feature_layer=26, grid=(4, 4), has_cls=False)


def reference(score: torch.Tensor, feats: torch.Tensor, n_imp: int, n_div: int, step: int = 8) -> list[int]:
    """The official rule written out with Python lists, one image, float64 similarities:
    importance order (stable), then rounds of even/odd split, best match to the odd half, drop
    the r best-matching even members, list = [even survivors by descending score] + odd."""
    n = score.numel()
    s = score.tolist()
    order = sorted(range(n), key=lambda i: (-s[i], i))
    important, residual = order[:n_imp], order[n_imp:]
    x = feats.double()
    x = x / x.norm(dim=-1, keepdim=True)
    if n_div > 0:
        while True:
            r = min(step, len(residual) - n_div, math.ceil(len(residual) / 2))
            if r <= 0:
                break
            a, b = residual[0::2], residual[1::2]
            best = (x[a] @ x[b].T).max(dim=1).values.tolist()     # each even member's best match
            by_score = sorted(range(len(a)), key=lambda k: (-best[k], k))
            residual = [a[k] for k in by_score[r:]] + b
    else:
        residual = []
    return sorted(important + residual)


# --- hand-worked cases -------------------------------------------------------------------------
def test_duplicate_of_the_odd_half_is_removed():
    # order 0,1,2,3 by score; token 0 important; residual [1, 2, 3] -> A = [1, 3], B = [2]; r = 1.
    e = torch.eye(3)
    feats = torch.stack([e[0], e[1], e[1], e[2]])            # token 1 duplicates token 2 (in B)
    score = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert vispruner_select(score, feats, 1, 2).tolist() == [0, 2, 3]
    feats = torch.stack([e[0], e[1], e[2], e[2]])            # now token 3 duplicates token 2
    assert vispruner_select(score, feats, 1, 2).tolist() == [0, 1, 2]


def test_rounds_reorder_the_list_as_the_official_concatenation():
    # one step at a time on 6 residual tokens down to 3 (step=1, three rounds); worked by hand:
    # R = [0..5] (no important); x0 = x2 (dup), x4 ~ x1, x3 ~ x5 partially.
    feats = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0.1], [0, 0.6, 0.8]])
    score = torch.tensor([6.0, 5, 4, 3, 2, 1])
    # round 1: A=[0,2,4] B=[1,3,5]: best(0)=0, best(2)=0, best(4)=max(.995, .0995, .677)=.995 -> drop 4;
    #          list = [0, 2] (desc score, tie -> earlier) + [1, 3, 5] = [0, 2, 1, 3, 5]
    # round 2: A=[0,1,5] B=[2,3]: best(0)=1 (dup of 2), best(1)=0, best(5)=.8 -> drop 0;
    #          list = [5, 1] + [2, 3] = [5, 1, 2, 3]
    # round 3: A=[5,2] B=[1,3]: best(5)=.8, best(2)=0 -> drop 5; list = [2] + [1, 3]
    assert vispruner_select(score, feats, 0, 3, step=1).tolist() == [1, 2, 3]
    assert reference(score, feats, 0, 3, step=1) == [1, 2, 3]


def test_important_tokens_are_the_top_scores_and_always_kept():
    g = torch.Generator().manual_seed(1)
    score, feats = torch.rand(64, generator=g), torch.randn(64, 8, generator=g)
    kept = vispruner_select(score, feats, 10, 6)
    top = torch.sort(score, descending=True, stable=True).indices[:10]
    assert set(top.tolist()) <= set(kept.tolist())


def test_ratio_one_is_pure_attention_top_k_and_zero_is_pure_diversity():
    g = torch.Generator().manual_seed(2)
    score, feats = torch.rand(36, generator=g), torch.randn(36, 5, generator=g)
    cfg = VisPrunerConfig(budget=9, important_ratio=1.0)
    toks = VisualTokens(grid=(6, 6), features=feats, scores={(22, "cls"): score})
    sel = SPEC.select(cfg, toks, 9, CLIP)
    assert sel.indices.tolist() == sorted(torch.sort(score, descending=True, stable=True).indices[:9].tolist())
    cfg0 = VisPrunerConfig(budget=9, important_ratio=0.0)
    assert SPEC.select(cfg0, toks, 9, CLIP).indices.tolist() == reference(score, feats, 0, 9)


# --- against the slow reference ----------------------------------------------------------------
@pytest.mark.parametrize("n,n_imp,n_div,step", [
    (576, 32, 32, 8), (576, 48, 16, 8), (576, 96, 96, 8),      # the paper's LLaVA-1.5 budgets
    (576, 0, 64, 8), (100, 7, 20, 8),                          # odd residual counts (official fails)
    (16, 2, 3, 8), (16, 0, 1, 8), (17, 1, 15, 8), (9, 0, 9, 8), (30, 5, 10, 3), (12, 3, 4, 1)])
def test_matches_the_slow_reference(n, n_imp, n_div, step):
    g = torch.Generator().manual_seed(n * 7 + n_imp + step)
    score, feats = torch.rand(n, generator=g), torch.randn(n, 16, generator=g)
    got = vispruner_select(score, feats, n_imp, n_div, step)
    assert got.tolist() == reference(score, feats, n_imp, n_div, step)


def test_exact_budget_for_every_n_keep():
    g = torch.Generator().manual_seed(3)
    n = 25
    score, feats = torch.rand(n, generator=g), torch.randn(n, 4, generator=g)
    cfg = VisPrunerConfig(keep=0.5)
    for n_keep in range(1, n + 1):
        n_imp, n_div = cfg.split(n_keep)
        kept = vispruner_select(score, feats, n_imp, n_div)
        assert kept.numel() == n_keep
        assert torch.equal(kept, torch.unique(kept))             # ascending, no repeats
        assert int(kept.min()) >= 0 and int(kept.max()) < n
    assert vispruner_select(score, feats, *cfg.split(n)).tolist() == list(range(n))   # n_keep = N


def test_diverse_positions_keep_exactly_the_target():
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(3, 21, 6, generator=g), dim=-1)
    sim = x @ x.transpose(1, 2)
    for target in (0, 1, 2, 10, 20, 21):
        pos = diverse_positions(sim, target, 8)
        assert pos.shape == (3, target)
        for row in pos:
            assert len(set(row.tolist())) == target


# --- determinism and ties ----------------------------------------------------------------------
def test_ties_break_by_lower_index_and_repeat_identically():
    score = torch.ones(16)
    feats = torch.ones(16, 3)                                     # every similarity is 1
    first = vispruner_select(score, feats, 2, 3)
    assert first.tolist() == reference(score, feats, 2, 3)
    assert first[:2].tolist() == [0, 1]                           # important: the lowest indices
    for _ in range(3):
        assert torch.equal(vispruner_select(score, feats, 2, 3), first)


def test_zero_features_do_not_make_nan():
    score = torch.arange(10, 0, -1).float()
    feats = torch.zeros(10, 4)
    kept = vispruner_select(score, feats, 2, 3)
    assert kept.numel() == 5 and torch.equal(kept, torch.unique(kept))


# --- batching ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,n_imp,n_div", [(576, 32, 32), (49, 3, 7), (16, 0, 1), (16, 8, 0), (16, 8, 8)])
def test_batch_equals_one_by_one(n, n_imp, n_div):
    g = torch.Generator().manual_seed(n + n_imp)
    score, feats = torch.rand(4, n, generator=g), torch.randn(4, n, 12, generator=g)
    batched = vispruner_select_batch(score, feats, n_imp, n_div)
    for i in range(4):
        assert torch.equal(batched[i], vispruner_select(score[i], feats[i], n_imp, n_div))


def test_spec_batch_and_single_agree():
    g = torch.Generator().manual_seed(5)
    score, feats = torch.rand(3, 36, generator=g), torch.randn(3, 36, 8, generator=g)
    cfg = VisPrunerConfig(budget=10)
    batch = SPEC.select_batch(cfg, VisualTokens(grid=(6, 6), features=feats, scores={(26, "mean"): score}),
                              10, NO_CLS)
    for i, sel in enumerate(batch):
        one = SPEC.select(cfg, VisualTokens(grid=(6, 6), features=feats[i], scores={(26, "mean"): score[i]}),
                          10, NO_CLS)
        assert torch.equal(sel.indices, one.indices) and sel.features is None


# --- config and requests -----------------------------------------------------------------------
@pytest.mark.parametrize("n_keep,ratio,split", [(64, 0.5, (32, 32)), (64, 0.75, (48, 16)), (128, 0.5, (64, 64)),
                                                (192, 0.5, (96, 96)), (1, 0.5, (0, 1)), (7, 0.5, (3, 4))])
def test_split_floors_as_the_official_code(n_keep, ratio, split):
    assert VisPrunerConfig(keep=0.5, important_ratio=ratio).split(n_keep) == split


def test_explicit_important_count():
    assert VisPrunerConfig(budget=64, important=40).split(64) == (40, 24)
    with pytest.raises(ConfigError):
        VisPrunerConfig(budget=16, important=17)
    with pytest.raises(ConfigError):
        VisPrunerConfig(keep=0.1, important=20).split(10)


@pytest.mark.parametrize("params", [{"important_ratio": 1.5}, {"important_ratio": -0.1}, {"important": -1},
                                    {"important_score": "max"}, {"removal_step": 0}, {"removal_step": 1.5}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ConfigError):
        VisPrunerConfig(keep=0.5, **params)


def test_requests_use_the_feature_layer_and_cls_only_where_there_is_one():
    assert SPEC.requests(VisPrunerConfig(keep=0.5), CLIP) == [ScoreRequest(22, "cls")]
    assert SPEC.requests(VisPrunerConfig(keep=0.5), NO_CLS) == [ScoreRequest(26, "mean")]
    assert SPEC.requests(VisPrunerConfig(keep=0.5, important_score="mean"), CLIP) == [ScoreRequest(22, "mean")]
    with pytest.raises(ConfigError):
        SPEC.requests(VisPrunerConfig(keep=0.5, important_score="cls"), NO_CLS)
    assert "features" in SPEC.needs and SPEC.features == "encoder"
