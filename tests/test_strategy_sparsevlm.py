"""SparseVLM (v1.5 rule): text raters, rater-averaged scores, exact per-stage budgets, recycling
(counts, DPC-kNN clusters in their centres' slots, uniform means) against hand-computed cases and
slow re-implementations, recycle=False == top-k, keep=1 identity, config checks, and the whole
two-stage pass on the tiny LLaVA against the unpatched decoder run by hand."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import N_TOK, layer_out, reference_embeds, single

import tokenprune
from tokenprune.config import ConfigError
from tokenprune.strategies import sparsevlm as sv
from tokenprune.strategies.base import LLMInfo, LLMTokens, Selection, topk_indices
from tokenprune.strategies.sparsevlm import (
    SparseVLMConfig,
    recycle_counts,
    sparsevlm_budget,
    sparsevlm_layers,
    sparsevlm_select,
    text_raters,
    visual_scores,
)


# --- slow references ------------------------------------------------------------------------------
def slow_raters(embeds: torch.Tensor, text: torch.Tensor) -> list[bool]:
    """Per text token: softmax over the text axis of each visual token's dot products, averaged
    over the visual tokens, compared with the mean of those averages (float64, plain loops)."""
    v, t = embeds.double().tolist(), text.double().tolist()
    rel = [0.0] * len(t)
    for row in v:
        logits = [sum(a * b for a, b in zip(row, tt)) for tt in t]
        m = max(logits)
        ex = [math.exp(x - m) for x in logits]
        z = sum(ex)
        for j, e in enumerate(ex):
            rel[j] += e / z / len(v)
    mean = sum(rel) / len(rel)
    out = [r > mean for r in rel]
    return out if any(out) else [True] * len(t)


def slow_dpc(x: torch.Tensor, n_clusters: int, k: int) -> tuple[list[int], list[int]]:
    """DPC-kNN written plainly in float64 (the official rule, ties to the lower index instead of
    noise): returns (centres ascending, cluster of every point as a position in ``centres``)."""
    xs = x.double()
    n, d = xs.shape
    dist = [[float((xs[i] - xs[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(dist[i])[:min(k, n)]) / min(k, n)) for i in range(n)]
    dmax = max(max(r) for r in dist)
    delta = []
    for i in range(n):
        higher = [dist[i][j] for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(higher) if higher else dmax)
    score = [rho[i] * delta[i] for i in range(n)]
    centres = sorted(sorted(range(n), key=lambda i: (-score[i], i))[:n_clusters])
    assign = []
    for i in range(n):
        if i in centres:
            assign.append(centres.index(i))
        else:
            assign.append(min(range(len(centres)), key=lambda c: (dist[i][centres[c]], c)))
    return centres, assign


def slow_select(score: torch.Tensor, hidden: torch.Tensor, n_keep: int, ratio: float = 0.3, per: int = 10):
    """The stage written plainly: counts, then top (n_keep - clusters) kept, the next n_recycled
    clustered; -> (indices ascending, features [n_keep, D] in that order)."""
    n = score.numel()
    order = sorted(range(n), key=lambda i: (-float(score[i]), i))
    n_prune = n - n_keep
    if n_prune == 0:
        return list(range(n)), hidden.double()
    n_rec = min(int(ratio * n_prune) + 1, n_prune)
    clusters = min(int(n_rec / per) + 1, n_rec)
    if n_keep - clusters < 1:
        kept = sorted(order[:n_keep])
        return kept, hidden[kept].double()
    kept, rec = order[:n_keep - clusters], order[n_keep - clusters:n_keep - clusters + n_rec]
    centres, assign = slow_dpc(hidden[rec], clusters, clusters)
    feats = {i: hidden[i].double() for i in kept}
    for c, ci in enumerate(centres):
        members = [rec[m] for m in range(len(rec)) if assign[m] == c]
        feats[rec[ci]] = torch.stack([hidden[m].double() for m in members]).mean(0)
    idx = sorted(feats)
    return idx, torch.stack([feats[i] for i in idx])


# --- raters and scores ----------------------------------------------------------------------------
def test_raters_hand_example():
    """Visual tokens [1, 0] and [2, 0]; text tokens [2, 0], [0, 5], [0, 0]: every visual token's
    dot products are (2, 0, 0) and (4, 0, 0) -> the first text token takes most of each softmax
    (relevance above the mean 1/3), the other two share the rest. The [0, 5] token has the largest
    norm but nothing in common with the image: not a rater."""
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 0.0]])
    assert text_raters(v, t).tolist() == [True, False, False]
    a, b = math.e ** 2 / (math.e ** 2 + 2), math.e ** 4 / (math.e ** 4 + 2)
    assert (a + b) / 2 > 1 / 3          # the hand computation behind the expectation


def test_raters_all_equal_means_every_text_token_rates():
    v = torch.randn(5, 4)
    t = torch.zeros(3, 4)               # every logit 0: uniform softmax, nobody above the mean
    assert text_raters(v, t).tolist() == [True, True, True]


@pytest.mark.parametrize("seed", range(4))
def test_raters_match_a_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    v, t = torch.randn(12, 6, generator=g), torch.randn(7, 6, generator=g)
    assert text_raters(v, t).tolist() == slow_raters(v, t)


def test_visual_scores_are_the_raters_mean_rows():
    ta = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.0], [0.9, 0.0, 0.0]])
    got = visual_scores(ta, torch.tensor([True, False, True]))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.1, 0.15]))


def test_no_text_falls_back_to_the_last_prompt_token_row():
    att = torch.tensor([0.1, 0.4, 0.3, 0.2])
    tok = LLMTokens(stage=0, n_in=4, attention=att, text_attention=torch.zeros(0, 4),
                    embeds=torch.randn(4, 3), text_embeds=torch.zeros(0, 3), hidden=torch.randn(4, 3))
    got = sv._select(SparseVLMConfig(budget=2, recycle=False), tok, 2)
    assert got.tolist() == [1, 2]


def test_select_reads_text_attention_through_the_raters():
    """Two text tokens: the rater (the one the image relates to) prefers token 0, the other token 3."""
    v = torch.tensor([[1.0, 0.0]] * 4)
    text = torch.tensor([[3.0, 0.0], [0.0, 3.0]])        # only text token 0 relates to the image
    ta = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.0, 0.1, 0.2, 0.8]])
    tok = LLMTokens(stage=0, n_in=4, attention=torch.tensor([0.0, 0.0, 0.0, 1.0]), text_attention=ta,
                    embeds=v, text_embeds=text, hidden=torch.randn(4, 2))
    assert sv._select(SparseVLMConfig(budget=1, recycle=False), tok, 1).tolist() == [0]


# --- budgets --------------------------------------------------------------------------------------
def test_schedule_budgets_are_exact():
    cfg = SparseVLMConfig(budget=300)
    assert [sparsevlm_budget(cfg, s, 300, 576) for s in range(3)] == [300, 200, 110]
    assert [sparsevlm_budget(cfg, s, 150, 576) for s in range(3)] == [150, 100, 55]
    # rounded half up, never below 1
    cfg = SparseVLMConfig(budget=3, schedule=(4, 2, 1))
    assert [sparsevlm_budget(cfg, s, 3, 64) for s in range(3)] == [3, 2, 1]    # 1.5 -> 2, 0.75 -> 1
    assert [sparsevlm_budget(SparseVLMConfig(budget=1), s, 1, 64) for s in range(3)] == [1, 1, 1]
    # the official 128 / 64 tables as schedules
    cfg = SparseVLMConfig(budget=303, schedule=(303, 110, 36))
    assert [sparsevlm_budget(cfg, s, 303, 576) for s in range(3)] == [303, 110, 36]


def test_keep_one_prunes_nothing_at_any_stage():
    cfg = SparseVLMConfig(keep=1.0)
    n = 64
    first = cfg.tokens_for(n)
    assert [sparsevlm_budget(cfg, s, first, n) for s in range(3)] == [n, n, n]
    g = torch.Generator().manual_seed(0)
    got = sparsevlm_select(torch.rand(n, generator=g), torch.randn(n, 8, generator=g), n)
    assert not isinstance(got, Selection) and got.tolist() == list(range(n))


@pytest.mark.parametrize("recycle", [True, False])
def test_every_budget_is_met_exactly(recycle):
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 5, 17, 64):
        score, hidden = torch.rand(n, generator=g), torch.randn(n, 6, generator=g)
        for k in range(1, n + 1):
            got = sparsevlm_select(score, hidden, k, recycle=recycle)
            idx = got.indices if isinstance(got, Selection) else got
            assert idx.numel() == k and torch.equal(idx, torch.unique(idx)), (n, k)
            if isinstance(got, Selection):
                assert got.features.shape == (k, 6)


# --- recycling ------------------------------------------------------------------------------------
def test_recycle_counts_follow_the_official_formula():
    # LLaVA-1.5's "192" stages (576 -> 300 -> 200 -> 110): 276 pruned -> 83 recycled -> 9 clusters
    assert recycle_counts(576, 300) == (291, 83, 9)
    assert recycle_counts(300, 200) == (196, 31, 4)      # 100 pruned -> 31 -> 4
    assert recycle_counts(200, 110) == (107, 28, 3)      # 90 pruned -> 28 -> 3
    assert recycle_counts(10, 9) == (8, 1, 1)            # one pruned: it is its own cluster
    assert recycle_counts(64, 64) == (64, 0, 0)          # nothing pruned
    assert recycle_counts(64, 1) == (1, 0, 0)            # 2 clusters would leave no kept token
    assert recycle_counts(64, 2) == (2, 0, 0)            # 62 pruned -> 19 -> 2 clusters: none kept as is
    assert recycle_counts(64, 3) == (1, 19, 2)           # 61 pruned -> 19 -> 2 clusters + 1 kept
    assert recycle_counts(40, 10, 0.5, 4) == (5, 16, 5)  # 30 -> 16 -> int(16/4)+1 = 5


def two_blobs():
    """40 candidates scored 40, 39, ..., 1; keep 10: 30 pruned -> 10 recycled -> 2 clusters, so
    tokens 0..7 stay as they are and 8..17 are clustered: 8..12 around (10, 0), 13..17 around (0, 10)."""
    n = 40
    score = torch.arange(n, 0, -1).float()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 2, generator=g) * 5
    hidden[8:13] = torch.tensor([10.0, 0.0]) + 0.1 * torch.randn(5, 2, generator=g)
    hidden[13:18] = torch.tensor([0.0, 10.0]) + 0.1 * torch.randn(5, 2, generator=g)
    return score, hidden


def test_recycled_clusters_sit_in_their_centres_slots_with_the_cluster_means():
    score, hidden = two_blobs()
    got = sparsevlm_select(score, hidden, 10)
    assert isinstance(got, Selection)
    idx = got.indices.tolist()
    assert idx[:8] == list(range(8)) and len(idx) == 10
    a, b = idx[8], idx[9]
    assert 8 <= a <= 12 and 13 <= b <= 17                # one centre per blob
    torch.testing.assert_close(got.features[:8], hidden[:8])             # kept: their own states
    torch.testing.assert_close(got.features[8], hidden[8:13].mean(0))    # centres: the cluster means
    torch.testing.assert_close(got.features[9], hidden[13:18].mean(0))
    # groups: kept tokens carry themselves, each blob its centre's slot, the rest is dropped
    assert got.groups[:8].tolist() == list(range(8))
    assert got.groups[8:13].tolist() == [8] * 5 and got.groups[13:18].tolist() == [9] * 5
    assert bool((got.groups[18:] == -1).all())


def test_only_the_best_scored_pruned_tokens_are_recycled():
    """Swap the scores of the blob tokens and of 20..29: now 20..29 are recycled, the blobs dropped."""
    score, hidden = two_blobs()
    score[8:18], score[20:30] = score[20:30].clone(), score[8:18].clone()
    got = sparsevlm_select(score, hidden, 10)
    assert all(20 <= i < 30 for i in got.indices[8:].tolist())
    assert bool((got.groups[8:18] == -1).all()) and bool((got.groups[20:30] >= 8).all())


@pytest.mark.parametrize("seed", range(6))
def test_selection_matches_a_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = [64, 40, 23, 100, 12, 57][seed]
    score, hidden = torch.rand(n, generator=g), torch.randn(n, 5, generator=g)
    for k in sorted({1, 2, 3, n // 5, n // 3, n // 2, n - 1, n}):
        got = sparsevlm_select(score, hidden, k)
        idx, feats = (got.indices, got.features) if isinstance(got, Selection) else (got, hidden[got])
        want_idx, want_feats = slow_select(score, hidden, k)
        assert idx.tolist() == want_idx, (n, k)
        torch.testing.assert_close(feats.double(), want_feats, atol=1e-5, rtol=1e-5)


def test_recycle_false_is_plain_top_k():
    g = torch.Generator().manual_seed(3)
    score, hidden = torch.rand(50, generator=g), torch.randn(50, 4, generator=g)
    for k in (1, 7, 25, 49, 50):
        got = sparsevlm_select(score, hidden, k, recycle=False)
        assert not isinstance(got, Selection)
        assert torch.equal(got, torch.sort(topk_indices(score, k)).values)


def test_ties_go_to_the_lower_index_and_runs_repeat():
    score = torch.zeros(30)
    hidden = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    got = sparsevlm_select(score, hidden, 10)
    assert got.indices[:8].tolist() == list(range(8))        # all tied: the first ones
    again = sparsevlm_select(score, hidden, 10)
    assert torch.equal(got.indices, again.indices) and torch.equal(got.features, again.features)
    assert torch.equal(got.groups, again.groups)


def test_features_keep_the_hidden_dtype():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 8, generator=g).to(torch.bfloat16)
    got = sparsevlm_select(torch.rand(40, generator=g), hidden, 10)
    assert got.features.dtype == torch.bfloat16


# --- configuration --------------------------------------------------------------------------------
def test_default_layers_scale_the_official_ones():
    cfg = SparseVLMConfig(budget=8)
    assert sparsevlm_layers(cfg, LLMInfo(32)) == [3, 7, 16]       # official 2 / 6 / 15 (their output)
    assert sparsevlm_layers(cfg, LLMInfo(28)) == [3, 6, 14]
    assert sparsevlm_layers(cfg, LLMInfo(3)) == [1, 2]             # the tiny test LLMs: two stages
    assert sparsevlm_layers(cfg, LLMInfo(32, min_layer=4)) == [4, 7, 16]


def test_explicit_layers_and_text_forms():
    cfg = SparseVLMConfig(budget=8, layers="2, 5", schedule="300,200,110")
    assert cfg.layers == (2, 5) and cfg.schedule == (300, 200, 110)
    assert sparsevlm_layers(cfg, LLMInfo(8)) == [2, 5]
    assert SparseVLMConfig(budget=8, layers=4).layers == (4,)
    assert SparseVLMConfig(budget=8, schedule=[5, 5]).schedule == (5, 5)
    with pytest.raises(ConfigError, match="out of range"):
        sparsevlm_layers(cfg, LLMInfo(5))
    with pytest.raises(ConfigError, match="out of range"):
        sparsevlm_layers(SparseVLMConfig(budget=8, layers=(1, 3)), LLMInfo(8, min_layer=2))


@pytest.mark.parametrize("params", [
    {"layers": (3, 3)}, {"layers": (0, 2)}, {"layers": "a,b"}, {"schedule": (300, 310, 110)},
    {"schedule": (300, 0)}, {"schedule": ()}, {"schedule": "x"}, {"layers": (1, 2, 3, 4)},
    {"recycle_ratio": 1.5}, {"recycle_ratio": -0.1}, {"cluster_ratio": 0}, {"cluster_ratio": 2.5},
    {"recycle": "yes"},
])
def test_bad_configs_are_refused(params):
    with pytest.raises(ConfigError):
        SparseVLMConfig(budget=8, **params)


def test_a_short_schedule_is_refused_for_the_default_stages():
    with pytest.raises(ConfigError, match="schedule"):
        sparsevlm_layers(SparseVLMConfig(budget=8, schedule=(300, 200)), LLMInfo(32))
    assert sparsevlm_layers(SparseVLMConfig(budget=8, schedule=(300, 200)), LLMInfo(3)) == [1, 2]


# --- the whole pass on the tiny LLaVA ---------------------------------------------------------------
@torch.no_grad()
def hand_run(clean, inp, cfg, first):
    """The unpatched decoder run layer by layer in eager mode (explicit causal masks): at each stage
    layer K the signals of layer K-1 are taken from its attention weights and the hidden states
    entering K, the stage is chosen by the unit-tested pure functions, the merged states written
    into their slots, and the sequence sliced (original positions). -> (logits, kept per stage)."""
    m = copy.deepcopy(clean)
    m.set_attn_implementation({"text_config": "eager"})
    lm = m.model.language_model
    ids = inp["input_ids"]
    emb = reference_embeds(clean, ids, inp["pixel_values"])
    length = emb.shape[1]
    image = torch.nonzero(ids[0] == 4).flatten()                  # one image: its N_TOK placeholders
    text = torch.nonzero(torch.arange(length) > image.max()).flatten()
    stages = sparsevlm_layers(cfg, LLMInfo(len(lm.layers)))
    att: dict[int, torch.Tensor] = {}
    hooks = [dec.self_attn.register_forward_hook(lambda mod, a, o, i=i: att.__setitem__(i, o[1]))
             for i, dec in enumerate(lm.layers)]
    h, pos = emb, torch.arange(length)[None]
    pe = lm.rotary_emb(h, pos)
    now = torch.arange(length)
    kept_per_stage = []
    try:
        for i, dec in enumerate(lm.layers):
            if i in stages:
                s = stages.index(i)
                rows = att[i - 1][0].float().mean(0)                       # [Lc, Lc]
                cand = torch.nonzero(torch.isin(now, image)).flatten()     # current candidates
                trow = torch.nonzero(torch.isin(now, text)).flatten()
                score = visual_scores(rows[trow][:, cand], text_raters(emb[0, image], emb[0, text]))
                n_keep = min(sparsevlm_budget(cfg, s, first, N_TOK), cand.numel())
                got = sparsevlm_select(score, h[0, cand], n_keep, cfg.recycle, cfg.recycle_ratio, cfg.cluster_ratio)
                if isinstance(got, Selection):
                    h = h.clone()
                    h[0, cand[got.indices]] = got.features
                    got = got.indices
                drop = torch.ones(now.numel(), dtype=torch.bool)
                drop[cand] = False
                drop[cand[got]] = True                                     # "drop" = stays, here
                sel = torch.nonzero(drop).flatten()
                now = now[sel]
                h, pos, pe = h[:, sel], pos[:, sel], (pe[0][:, sel], pe[1][:, sel])
                kept_per_stage.append(torch.sort(now[torch.isin(now, image)] - image.min()).values)
            n = h.shape[1]
            mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            h = layer_out(dec(h, attention_mask=mask, position_ids=pos, position_embeddings=pe))
    finally:
        for hk in hooks:
            hk.remove()
    return m.lm_head(lm.norm(h)), kept_per_stage


@pytest.mark.parametrize("params", [{}, {"recycle": False}])
def test_two_stage_pass_equals_the_decoder_run_by_hand(model, params):
    """Tiny LLaVA (3 layers -> stages at K = 1, 2), 64 tokens, budget 20: stage 0 keeps 18 + 2
    clusters, stage 1 keeps round(20 * 200 / 300) = 13 (12 + 1 cluster)."""
    inp = single(1)
    clean = copy.deepcopy(model)
    cfg = SparseVLMConfig(budget=20, **params)
    h = tokenprune.apply(model, "sparsevlm", budget=20, **params)
    with torch.no_grad():
        out = model(**inp).logits
    st = h.last_stats
    ref, kept = hand_run(clean, inp, cfg, 20)
    assert [s.layer for s in st.stages] == [1, 2]
    assert [s.tokens_kept[0] for s in st.stages] == [20, 13]
    for s, want in zip(st.stages, kept):
        assert torch.equal(s.kept_indices[0][0], want)
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-5)
    h.remove()
