"""PruMerge / PruMerge+'s pure functions: the fixed-budget selection and the k-nearest merge against
hand-worked cases and a slow list-based re-implementation (numpy percentiles, as the official
code), exact budgets, ties, edge budgets, batching, the config and the score requests."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenprune.config import ConfigError
from tokenprune.errors import IncompatibleStrategyError
from tokenprune.strategies.base import ScoreRequest, VisionInfo, VisualTokens
from tokenprune.strategies.prumerge import (
    SPEC,
    PruMergeConfig,
    iqr_outlier_count,
    prumerge_keep_mask,
    prumerge_select,
    prumerge_select_batch,
)

CLIP = VisionInfo(num_layers=24, feature_layer=22, grid=(8, 8), has_cls=True)
NO_CLS = VisionInfo(num_layers=27, feature_layer=26, grid=(8, 8), has_cls=False)


def reference(score, keys, feats, n, plus=True, knn=32, iqr_scale=1.5):
    """The rule written out with Python lists for one image: (kept, merged float64, groups)."""
    n_tok = score.numel()
    if n == n_tok:
        return list(range(n_tok)), None, None
    s = score.float().numpy()
    q1, q3 = np.percentile(s, 25), np.percentile(s, 75)
    outliers = [i for i in range(n_tok) if s[i] > q3 + iqr_scale * (q3 - q1)]
    order = sorted(range(n_tok), key=lambda i: (-float(s[i]), i))
    if plus:
        imp = order[:min(len(outliers), n)]
        rest = [i for i in range(n_tok) if i not in imp]
        m = n - len(imp)
        kept = sorted(imp + [rest[(j * len(rest)) // m] for j in range(m)])
    else:
        kept = sorted(order[:n])
    kn = F.normalize(keys.float(), dim=-1)
    sim = (kn @ kn.T).tolist()
    x, a = feats.double(), score.double().tolist()
    merged, takers = [], {}
    for p, i in enumerate(kept):
        cands = sorted((j for j in range(n_tok) if j != i), key=lambda j: (-sim[i][j], j))[:min(knn, n_tok - 1)]
        merged.append(x[i] + sum(a[j] * x[j] for j in cands))
        for j in cands:
            takers.setdefault(j, []).append((-sim[i][j], p))
    groups = [-1] * n_tok
    for j, t in takers.items():
        groups[j] = min(t)[1]
    for p, i in enumerate(kept):
        groups[i] = p
    return kept, torch.stack(merged), groups


def data(seed, n_tok=64, d=8, dim=6, sharp=3.0, b=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n_tok,) if b is None else (b, n_tok)
    score = torch.softmax(torch.randn(*shape, generator=g) * sharp, -1)
    keys = torch.randn(*shape, d, generator=g)
    feats = torch.randn(*shape, dim, generator=g)
    return score, keys, feats


# --- the selection rule --------------------------------------------------------------------------
def test_hand_worked_outliers_then_uniform_samples():
    # ten tokens at 0.05, two outliers (3: 0.5, 8: 0.3): Q1 = Q3 = 0.05, fence 0.05 -> 2 outliers
    s = torch.full((12,), 0.05)
    s[3], s[8] = 0.5, 0.3
    assert iqr_outlier_count(s[None]).tolist() == [2]
    kept = lambda n, plus=True: torch.nonzero(prumerge_keep_mask(s[None], n, plus=plus)[0]).flatten().tolist()  # noqa: E731
    # n=5: {3, 8} + 3 samples of the 10 left at positions floor(j*10/3) = 0, 3, 6 -> tokens 0, 4, 7
    assert kept(5) == [0, 3, 4, 7, 8]
    assert kept(2) == [3, 8]
    assert kept(1) == [3]                       # outliers truncated by attention
    # PruMerge (no plus): the next-highest attention, ties -> lower index
    assert kept(5, plus=False) == [0, 1, 2, 3, 8]


def test_no_outliers_gives_a_flat_stride_over_the_grid():
    s = torch.ones(1, 24)                       # IQR 0, nothing strictly above Q3
    assert iqr_outlier_count(s).tolist() == [0]
    mask = prumerge_keep_mask(s, 6)[0]
    assert torch.nonzero(mask).flatten().tolist() == [0, 4, 8, 12, 16, 20]
    mask = prumerge_keep_mask(s, 5)[0]
    assert torch.nonzero(mask).flatten().tolist() == [(j * 24) // 5 for j in range(5)]


def test_iqr_count_matches_numpy_percentile():
    for seed in range(5):
        s = data(seed, n_tok=576)[0]
        q1, q3 = np.percentile(s.numpy(), 25), np.percentile(s.numpy(), 75)
        want = int((s.numpy() > q3 + 1.5 * (q3 - q1)).sum())
        assert iqr_outlier_count(s[None]).tolist() == [want]
        want3 = int((s.numpy() > q3 + 3.0 * (q3 - q1)).sum())
        assert iqr_outlier_count(s[None], 3.0).tolist() == [want3] and want3 <= want


def test_hand_worked_merge_and_groups():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, -1.0]])
    score = torch.tensor([0.4, 0.1, 0.3, 0.2, 0.0])
    x = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    sel = prumerge_select(score, keys, x, 2, plus=False, knn=1)
    assert sel.indices.tolist() == [0, 2]
    torch.testing.assert_close(sel.features, torch.stack([x[0] + 0.1 * x[1], x[2] + 0.2 * x[3]]))
    assert sel.groups.tolist() == [0, 0, 1, 1, -1]          # token 4 is nobody's neighbour: dropped
    # knn=2: kept tokens absorb each other's neighbours too; groups follow the higher similarity
    sel = prumerge_select(score, keys, x, 2, plus=False, knn=2)
    torch.testing.assert_close(sel.features, torch.stack([x[0] + 0.1 * x[1] + 0.2 * x[3],
                                                          x[2] + 0.2 * x[3] + 0.1 * x[1]]))
    assert sel.groups.tolist() == [0, 0, 1, 1, -1]
    # knn=4 (all others): token 0 also takes kept token 2 (the official merge includes kept ones)
    sel = prumerge_select(score, keys, x, 2, plus=False, knn=4)
    torch.testing.assert_close(sel.features[0], x[0] + 0.1 * x[1] + 0.3 * x[2] + 0.2 * x[3])
    assert sel.groups.tolist()[:4] == [0, 0, 1, 1] and sel.groups[4] in (0, 1)


@pytest.mark.parametrize("plus", [True, False])
@pytest.mark.parametrize("knn", [32, 5])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 7, 16, 33, 63])
def test_same_as_the_slow_reference(seed, n, knn, plus):
    score, keys, feats = data(seed)
    sel = prumerge_select(score, keys, feats, n, plus=plus, knn=knn)
    kept, merged, groups = reference(score, keys, feats, n, plus=plus, knn=knn)
    assert sel.indices.tolist() == kept
    torch.testing.assert_close(sel.features.double(), merged, atol=1e-5, rtol=1e-5)
    assert sel.groups.tolist() == groups


@pytest.mark.parametrize("n", [32, 144, 192])
def test_same_as_the_slow_reference_on_a_clip_grid(n):
    score, keys, feats = data(7, n_tok=576, d=64, dim=16, sharp=4.0)
    sel = prumerge_select(score, keys, feats, n)
    kept, merged, groups = reference(score, keys, feats, n)
    assert sel.indices.tolist() == kept
    torch.testing.assert_close(sel.features.double(), merged, atol=1e-5, rtol=1e-5)
    assert sel.groups.tolist() == groups


@pytest.mark.parametrize("plus", [True, False])
def test_exact_budget_for_every_n(plus):
    score, keys, feats = data(3, n_tok=36)
    for n in range(1, 37):
        sel = prumerge_select(score, keys, feats, n, plus=plus)
        idx = sel.indices
        assert idx.numel() == n and torch.equal(idx, torch.unique(idx))
        if n < 36:
            assert sel.features.shape == (n, feats.shape[1]) and sel.groups.shape == (36,)
            assert torch.equal(sel.groups[idx], torch.arange(n))
            assert int(sel.groups.max()) < n and int(sel.groups.min()) >= -1


def test_keep_all_is_the_identity_and_keep_one_is_the_top_token():
    score, keys, feats = data(1)
    sel = prumerge_select(score, keys, feats, 64)
    assert torch.equal(sel.indices, torch.arange(64)) and sel.features is None and sel.groups is None
    sel = prumerge_select(score, keys, feats, 1)
    assert sel.indices.tolist() == [int(torch.argmax(score))]
    assert int((sel.groups == 0).sum()) == 1 + 32     # itself and its 32 neighbours


def test_plus_keeps_every_outlier_when_they_fit_and_plain_is_top_attention():
    score, keys, feats = data(2, n_tok=576, sharp=4.0)
    k = int(iqr_outlier_count(score[None])[0])
    assert 0 < k < 144
    kept = set(prumerge_select(score, keys, feats, 144).indices.tolist())
    top = torch.sort(score, descending=True, stable=True).indices
    assert set(top[:k].tolist()) <= kept
    plain = prumerge_select(score, keys, feats, 144, plus=False).indices
    assert torch.equal(plain, torch.sort(top[:144]).values)


def test_ties_are_deterministic_lower_index_first():
    score = torch.full((16,), 1 / 16)
    keys = torch.ones(16, 4)                    # every similarity ties
    feats = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    a = prumerge_select(score, keys, feats, 4, knn=2)
    b = prumerge_select(score.clone(), keys.clone(), feats.clone(), 4, knn=2)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.features, b.features)
    assert a.indices.tolist() == [0, 4, 8, 12]
    # each kept token's 2 neighbours are the lowest other indices: 0 -> {1, 2}, others -> {0, 1}
    torch.testing.assert_close(a.features[0], feats[0] + (feats[1] + feats[2]) / 16)
    torch.testing.assert_close(a.features[2], feats[8] + (feats[0] + feats[1]) / 16)
    assert a.groups.tolist()[:3] == [0, 0, 0] and a.groups[3:].tolist().count(-1) == 10


@pytest.mark.parametrize("plus", [True, False])
@pytest.mark.parametrize("n", [1, 9, 40, 64])
def test_batch_equals_one_by_one(n, plus):
    score, keys, feats = data(5, b=4)
    score[1] = torch.softmax(score[1] * 40, -1)     # rows with very different outlier counts
    score[2] = 1 / 64
    counts = iqr_outlier_count(score).tolist()
    assert len(set(counts)) > 2
    batch = prumerge_select_batch(score, keys, feats, n, plus=plus)
    for i, got in enumerate(batch):
        one = prumerge_select(score[i], keys[i], feats[i], n, plus=plus)
        assert torch.equal(got.indices, one.indices)
        if n == 64:
            assert got.features is None and one.features is None
            continue
        torch.testing.assert_close(got.features, one.features, atol=1e-6, rtol=1e-6)
        assert torch.equal(got.groups, one.groups)


def test_merge_off_keeps_the_same_tokens_unmerged():
    score, keys, feats = data(4)
    a = prumerge_select(score, keys, feats, 20)
    b = prumerge_select(score, None, None, 20, merge=False)
    assert torch.equal(a.indices, b.indices) and b.features is None and b.groups is None


def test_low_precision_features_keep_their_dtype():
    score, keys, feats = data(6)
    sel = prumerge_select(score, keys, feats.to(torch.bfloat16), 10)
    assert sel.features.dtype == torch.bfloat16
    ref = prumerge_select(score, keys, feats.to(torch.bfloat16).float(), 10)
    torch.testing.assert_close(sel.features.float(), ref.features, atol=0.05, rtol=0.02)


# --- spec, config, requests ----------------------------------------------------------------------
def test_requests_layer_and_score_kind():
    cfg = PruMergeConfig(keep=0.25)
    # LLaVA-1.5: features from layer 23 (1-based) of 24; scores from the last layer, as the official
    assert SPEC.requests(cfg, CLIP) == [ScoreRequest(23, "cls"), ScoreRequest(23, "keys")]
    # feature layer = last layer (no CLS): the feature layer itself, attention received
    assert SPEC.requests(cfg, NO_CLS) == [ScoreRequest(26, "mean"), ScoreRequest(26, "keys")]
    assert SPEC.requests(PruMergeConfig(keep=0.25, merge=False), CLIP) == [ScoreRequest(23, "cls")]
    assert SPEC.requests(PruMergeConfig(keep=0.25, layer=12, score="mean"), CLIP) == [
        ScoreRequest(11, "mean"), ScoreRequest(11, "keys")]
    with pytest.raises(IncompatibleStrategyError, match="CLS"):
        SPEC.requests(PruMergeConfig(keep=0.25, score="cls"), NO_CLS)
    with pytest.raises(ConfigError, match="out of range"):
        SPEC.requests(PruMergeConfig(keep=0.25, layer=30), NO_CLS)


@pytest.mark.parametrize("bad", [{"knn": 0}, {"knn": 2.5}, {"iqr_scale": -1.0}, {"score": "max"},
                                 {"plus": "yes"}, {"merge": 1}, {"layer": 0}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        PruMergeConfig(keep=0.5, **bad)


def test_spec_select_and_select_batch_agree():
    score, keys, feats = data(8, b=3)
    cfg = PruMergeConfig(budget=12)
    batched = SPEC.select_batch(cfg, VisualTokens(grid=(8, 8), features=feats,
                                                  scores={(23, "cls"): score, (23, "keys"): keys}), 12, CLIP)
    for i, got in enumerate(batched):
        one = SPEC.select(cfg, VisualTokens(grid=(8, 8), features=feats[i],
                                            scores={(23, "cls"): score[i], (23, "keys"): keys[i]}), 12, CLIP)
        assert torch.equal(got.indices, one.indices) and torch.equal(got.groups, one.groups)
        torch.testing.assert_close(got.features, one.features, atol=1e-6, rtol=1e-6)
        want = prumerge_select(score[i], keys[i], feats[i], 12)
        assert torch.equal(one.indices, want.indices)


# --- on a tiny real LLaVA ------------------------------------------------------------------------
def test_tiny_llava_scores_from_the_last_layer_and_merged_features_reach_the_llm():
    """The engine hands in the CLS row of the layer after the feature layer (4-layer CLIP, feature
    layer 3 (1-based) -> layer 4); the kept set is the rule on it; merging changes the logits, the
    kept set does not depend on it."""
    import tokenprune
    from tokenprune.eval.tiny import build_llava, prompt_ids

    model = build_llava(seed=0, attn_implementation="eager")
    ids = prompt_ids(64, seed=0)
    pix = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix}
    with torch.no_grad():
        att = model.model.vision_tower(pix, output_attentions=True).attentions
    assert len(att) == 4
    cls_row = att[3][0, :, 0, 1:].mean(0)                   # layer 4 (index 3), heads averaged
    n = 16
    want = torch.nonzero(prumerge_keep_mask(cls_row[None], n)[0]).flatten()
    out = {}
    for merge in (True, False):
        with tokenprune.apply(model, "prumerge", budget=n, merge=merge) as h:
            with torch.no_grad():
                out[merge] = model(**inp).logits
            st = h.last_stats
            assert torch.equal(st.kept_indices[0][0], want)
            assert (st.merge_groups[0][0] is not None) == merge
    assert not torch.allclose(out[True], out[False])


def test_score_cls_on_a_tower_without_cls_is_refused_before_any_hook():
    import tokenprune
    from tokenprune.eval.tiny import build_qwen
    from tokenprune.testing import hook_snapshot

    model = build_qwen("qwen2_vl")
    before = hook_snapshot(model)
    with pytest.raises(IncompatibleStrategyError, match="CLS"):
        tokenprune.apply(model, "prumerge", keep=0.25, score="cls")
    assert hook_snapshot(model) == before and tokenprune.get_handle(model) is None
    tokenprune.apply(model, "prumerge", keep=0.25).remove()        # "auto": attention received
