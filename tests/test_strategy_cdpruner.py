"""CDPruner: the fast greedy MAP against a brute-force greedy on log-determinants of kernel
submatrices (float64, ``torch.logdet``), the relevance sign / normalisation on hand examples, the
no-text fallback, the theta option, the degenerate-residual guard, exact budgets, ties,
determinism, batching and the large-N path."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tokenprune.config import ConfigError
from tokenprune.registry import get_strategy
from tokenprune.strategies import cdpruner as cd
from tokenprune.strategies.base import VisualTokens
from tokenprune.strategies.cdpruner import CDPrunerConfig, cdpruner_select, cdpruner_select_batch, greedy_map, relevance_scores


# --- slow references ------------------------------------------------------------------------------
def slow_relevance(features: torch.Tensor, text: torch.Tensor | None, negate: bool = False,
                   theta: float | None = None) -> torch.Tensor:
    """Written plainly in float64: mean over text tokens of the cosine, min-max as the official
    ``(rel - min + 1e-6) / (max - min)``, 1 without text or range; exp(alpha r) with theta."""
    x = features.double()
    n = x.shape[0]
    if text is None or text.shape[0] == 0:
        r = torch.ones(n, dtype=torch.float64)
    else:
        t = text.double()
        rel = torch.tensor([sum(float(F.cosine_similarity(x[i], t[k], dim=0)) for k in range(t.shape[0])) / t.shape[0]
                            for i in range(n)], dtype=torch.float64)
        if negate:
            rel = -rel
        lo, hi = float(rel.min()), float(rel.max())
        r = (rel - lo + 1e-6) / (hi - lo) if hi - lo > 1e-6 else torch.ones(n, dtype=torch.float64)
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


def kernel64(features: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    x = F.normalize(features.double(), dim=-1)
    s = x @ x.T
    s.diagonal().copy_((x.abs().sum(-1) > 0).double())    # cos(x, x) = 1 exactly (0 for a zero token)
    return r.double()[:, None] * s * r.double()[None, :]


def logdet(kernel: torch.Tensor, ids: list[int]) -> float:
    if not ids:
        return 0.0
    sub = kernel[ids][:, ids]
    return float(torch.logdet(sub))


def brute_greedy(kernel: torch.Tensor, n_keep: int, guard: float = cd.DEGENERATE) -> list[int]:
    """The greedy MAP written as its definition: repeatedly add the unpicked token whose addition
    gives the largest ``log det L_Y`` (ties: lower index). The guard, from determinants too: a token
    is available while ``det L_{B+i} / (det L_B * L_ii)`` (its squared sine to the span of the
    picks, B = the picks made while available: the later ones lie in their span) exceeds
    ``guard``; with none available, the unpicked token with the largest ``L_ii``."""
    n = kernel.shape[0]
    picked: list[int] = []
    basis: list[int] = []
    for _ in range(n_keep):
        base = logdet(kernel, basis)
        best, pick = -math.inf, None
        for i in range(n):
            if i in picked:
                continue
            lii = float(kernel[i, i])
            if lii <= 0:
                continue
            gain = logdet(kernel, basis + [i])           # NaN / -inf when singular
            if math.isnan(gain) or gain == -math.inf:
                continue
            if gain - base - math.log(lii) <= math.log(guard):
                continue
            if gain > best:
                best, pick = gain, i
        if pick is None:                                  # nothing available: most relevant left
            pick = max((i for i in range(n) if i not in picked), key=lambda i: (float(kernel[i, i]), -i))
        else:
            basis.append(pick)
        picked.append(pick)
    return picked


def official_loop64(kernel: torch.Tensor, n_keep: int) -> list[int]:
    """The official fast greedy (no guard), in float64, for a well-conditioned kernel."""
    n = kernel.shape[0]
    cis = torch.zeros(n_keep, n, dtype=torch.float64)
    d2 = kernel.diagonal().clone()
    out = []
    for i in range(n_keep):
        j = int(torch.argmax(d2))
        out.append(j)
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / math.sqrt(float(d2[j]))
        cis[i] = e
        d2 = d2 - e * e
        d2[j] = -math.inf
    return out


def rand_case(seed: int, n: int, d: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(t, d, generator=g)


# --- the greedy MAP -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("opts", [{}, {"negate": True}, {"theta": 0.5}, {"theta": 0.8, "negate": True}],
                         ids=["plain", "negate", "theta0.5", "theta0.8neg"])
def test_greedy_equals_logdet_brute_force(seed, opts):
    """Full-rank kernels (N <= D): the pick order of the fast greedy equals the brute-force
    log-det greedy for every budget, and the official loop (float64) too."""
    f, txt = rand_case(seed, 9, 12, 4)
    r = relevance_scores(f.unsqueeze(0), [txt], **opts)[0]
    k64 = kernel64(f, r)
    ref = brute_greedy(k64, 9)
    assert official_loop64(k64, 9) == ref
    order = greedy_map(F.normalize(f, dim=-1).unsqueeze(0), r.unsqueeze(0), 9)[0].tolist()
    assert order == ref
    for n_keep in range(1, 10):
        got = cdpruner_select(f, txt, n_keep, **opts).tolist()
        assert got == sorted(ref[:n_keep])


@pytest.mark.parametrize("seed", range(4))
def test_rank_deficient_kernel_meets_the_budget_and_matches_the_guarded_brute_force(seed):
    """N > D: after D picks every residual is (numerically) 0; the guard then picks by relevance
    (L_ii) descending, distinct, exactly n_keep, as the brute-force greedy with the same guard."""
    f, txt = rand_case(100 + seed, 14, 4, 3)
    r = relevance_scores(f.unsqueeze(0), [txt])[0]
    ref = brute_greedy(kernel64(f, r), 14)
    order = greedy_map(F.normalize(f, dim=-1).unsqueeze(0), r.unsqueeze(0), 14)[0].tolist()
    assert order[:4] == ref[:4]
    assert sorted(order) == list(range(14))
    tail = order[4:]
    assert tail == sorted(tail, key=lambda i: (-float(r[i]) ** 2, i))      # relevance order after the rank
    assert order == ref
    for n_keep in range(1, 15):
        got = cdpruner_select(f, txt, n_keep)
        assert got.numel() == n_keep and torch.equal(got, got.unique())   # distinct, ascending


def test_duplicates_and_zero_tokens_ties_to_the_lower_index():
    """Tokens 1 and 3 identical, token 4 all zero, no text (r = 1, kernel = S): the first pick is
    token 0 (every diagonal 1, lower index); 1 and 3 are orthogonal to 0, so 1 next (tie with 3);
    3 then has no residual left, 2 has; the zero token's kernel row is 0: it comes last, after 3."""
    f = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]])
    order = greedy_map(F.normalize(f, dim=-1).unsqueeze(0), torch.ones(1, 5), 5)[0].tolist()
    assert order == [0, 1, 2, 3, 4]
    assert cdpruner_select(f, None, 3).tolist() == [0, 1, 2]
    assert cdpruner_select(f, None, 4).tolist() == [0, 1, 2, 3]
    assert cdpruner_select(f, None, 5).tolist() == [0, 1, 2, 3, 4]


def test_nan_features_still_give_distinct_tokens():
    f, txt = rand_case(7, 8, 16, 2)
    f[2] = float("nan")
    for n_keep in (1, 4, 8):
        got = cdpruner_select(f, txt, n_keep)
        assert got.numel() == n_keep and torch.equal(got, got.unique())


def test_n_keep_all_and_one_and_bounds():
    f, txt = rand_case(3, 10, 6, 3)
    assert cdpruner_select(f, txt, 10).tolist() == list(range(10))
    one = cdpruner_select(f, txt, 1)
    r = relevance_scores(f.unsqueeze(0), [txt])[0]
    assert one.tolist() == [int(torch.argmax(r))]                          # first pick: argmax of L_ii = r_i^2
    with pytest.raises(ValueError):
        cdpruner_select(f, txt, 0)
    with pytest.raises(ValueError):
        cdpruner_select(f, txt, 11)


def test_deterministic_and_dtype_independent_of_input_precision_path():
    f, txt = rand_case(11, 40, 32, 5)
    a = cdpruner_select(f, txt, 12)
    assert torch.equal(a, cdpruner_select(f.clone(), txt.clone(), 12))
    b = cdpruner_select(f.bfloat16(), txt.bfloat16(), 12)                 # runs in float32 whatever the dtype
    assert b.dtype == torch.long and b.numel() == 12


# --- relevance ------------------------------------------------------------------------------------
def test_relevance_sign_and_min_max_by_hand():
    """features e1, e2, (e1 + e2)/sqrt2, text e1: cosines 1, 0, 1/sqrt2. Positive sign (ours):
    (c - 0 + 1e-6) / 1; negated (official CLIP): (-c + 1 + 1e-6) / 1."""
    s = 1 / math.sqrt(2)
    f = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [s, s, 0]])
    txt = torch.tensor([[3.0, 0, 0]])                                      # norm does not matter
    pos = relevance_scores(f.unsqueeze(0), [txt])[0]
    assert torch.allclose(pos, torch.tensor([1 + 1e-6, 1e-6, s + 1e-6]), atol=1e-6)
    neg = relevance_scores(f.unsqueeze(0), [txt], negate=True)[0]
    assert torch.allclose(neg, torch.tensor([1e-6, 1 + 1e-6, 1 - s + 1e-6]), atol=1e-6)
    # the sign decides the first pick (S = I on orthogonal tokens: the greedy takes r^2 order)
    g = torch.eye(3)
    assert cdpruner_select(g, torch.tensor([[1.0, 0.2, 0]]), 1).tolist() == [0]
    assert cdpruner_select(g, torch.tensor([[1.0, 0.2, 0]]), 1, negate=True).tolist() == [2]


def test_relevance_is_the_mean_of_cosines_over_text_tokens():
    """text [e1, 2 e2]: token e1 has cosines 1 and 0 -> mean 0.5 (the cosine with the mean
    embedding would be 0.447); token e3 -> 0; token (e1+e2)/sqrt2 -> 1/sqrt2."""
    s = 1 / math.sqrt(2)
    f = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [s, s, 0]])
    txt = torch.tensor([[1.0, 0, 0], [0, 2.0, 0]])
    r = relevance_scores(f.unsqueeze(0), [txt])[0]
    span = s - 0.0
    assert torch.allclose(r, torch.tensor([(0.5 + 1e-6) / span, 1e-6 / span, (s + 1e-6) / span]), atol=1e-6)
    assert torch.allclose(r.double(), slow_relevance(f, txt), atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_relevance_matches_the_slow_reference(seed):
    f, txt = rand_case(200 + seed, 12, 8, 5)
    for opts in ({}, {"negate": True}, {"theta": 0.5}, {"theta": 0.25, "negate": True}):
        got = relevance_scores(f.unsqueeze(0), [txt], **opts)[0].double()
        assert torch.allclose(got, slow_relevance(f, txt, **opts), rtol=1e-5, atol=1e-6)


def test_no_text_falls_back_to_pure_diversity():
    """T = 0 (or None): r = 1, the kernel is S: the same as a text every token is equally close
    to (constant relevance) and as the greedy on r = 1."""
    f, _ = rand_case(5, 12, 16, 1)
    none = cdpruner_select(f, None, 5)
    assert torch.equal(none, cdpruner_select(f, torch.zeros(0, 16), 5))
    assert torch.equal(relevance_scores(f.unsqueeze(0), [None])[0], torch.ones(12))
    pure = greedy_map(F.normalize(f, dim=-1).unsqueeze(0), torch.ones(1, 12), 5)[0]
    assert none.tolist() == sorted(pure.tolist())
    assert none.tolist() == sorted(brute_greedy(kernel64(f, torch.ones(12)), 5))
    assert cdpruner_select(f, None, 1).tolist() == [0]                    # every L_ii = 1: a tie, lower index
    # a text orthogonal to every token: a constant (zero) relevance range -> r = 1 too
    g = torch.cat([f, torch.zeros(12, 1)], 1)
    e = torch.zeros(1, 17)
    e[0, 16] = 1.0
    assert torch.equal(relevance_scores(g.unsqueeze(0), [e])[0], torch.ones(12))
    assert torch.equal(cdpruner_select(g, e, 5), none)


# --- theta ----------------------------------------------------------------------------------------
def test_theta_is_the_official_exponential_weighting():
    f, txt = rand_case(9, 10, 8, 3)
    plain = relevance_scores(f.unsqueeze(0), [txt])
    assert cd.theta_alpha(0.5) == 0.5
    assert torch.allclose(relevance_scores(f.unsqueeze(0), [txt], theta=0.5), torch.exp(0.5 * plain))
    assert torch.allclose(relevance_scores(f.unsqueeze(0), [txt], theta=0.8), torch.exp(2.0 * plain))
    # theta = 0: alpha = 0, r = 1: pure diversity
    assert torch.equal(cdpruner_select(f, txt, 4, theta=0.0), cdpruner_select(f, None, 4))


def test_theta_changes_the_choice_by_hand():
    """A = e1, A' = 0.99 e1 + 0.141 e2 (near duplicate), B = e3, text e1: r ~ (1, 0.99, 1e-6).
    Plain kernel: B's quality ~1e-12 loses to A's near duplicate -> {A, A'}. theta = 0.5:
    r = exp(0.5 r) ~ (1.65, 1.64, 1): B's diversity wins -> {A, B}."""
    f = torch.tensor([[1.0, 0, 0], [0.99, math.sqrt(1 - 0.99 ** 2), 0], [0, 0, 1.0]])
    txt = torch.tensor([[1.0, 0, 0]])
    assert cdpruner_select(f, txt, 2).tolist() == [0, 1]
    assert cdpruner_select(f, txt, 2, theta=0.5).tolist() == [0, 2]


def test_config_validation():
    assert CDPrunerConfig(keep=0.25).theta is None
    assert CDPrunerConfig(keep=0.25, theta=0.5).theta == 0.5
    assert CDPrunerConfig(budget=64, theta=0).theta == 0
    for bad in (1, 1.0, 1.5, -0.1, float("nan"), "0.5", True):
        with pytest.raises(ConfigError):
            CDPrunerConfig(keep=0.25, theta=bad)
    with pytest.raises(ConfigError):
        CDPrunerConfig(keep=0.25, negate_relevance="yes")
    assert {f.name for f in dataclasses.fields(CDPrunerConfig)} >= {"theta", "negate_relevance"}


# --- batching, spec, large N ----------------------------------------------------------------------
def test_batch_equals_one_by_one_with_a_text_per_unit():
    g = torch.Generator().manual_seed(42)
    f = torch.randn(4, 20, 16, generator=g)
    texts = [torch.randn(3, 16, generator=g), None, torch.randn(7, 16, generator=g), torch.zeros(0, 16)]
    for opts in ({}, {"theta": 0.5}, {"negate": True}):
        got = cdpruner_select_batch(f, texts, 6, **opts)
        want = torch.stack([cdpruner_select(f[i], texts[i], 6, **opts) for i in range(4)])
        assert torch.equal(got, want)
    same_t = torch.randn(4, 5, 16, generator=g)                           # a [B, T, D] tensor
    got = cdpruner_select_batch(f, same_t, 6)
    assert torch.equal(got, torch.stack([cdpruner_select(f[i], same_t[i], 6) for i in range(4)]))


def test_large_n_path_equals_the_materialised_kernel(monkeypatch):
    g = torch.Generator().manual_seed(8)
    f = torch.randn(3, 30, 24, generator=g)
    texts = [torch.randn(4, 24, generator=g) for _ in range(3)]
    want = cdpruner_select_batch(f, texts, 10, theta=0.5)
    monkeypatch.setattr(cd, "MAX_KERNEL_ELEMENTS", 0)
    assert torch.equal(cdpruner_select_batch(f, texts, 10, theta=0.5), want)


def test_spec_and_selection_through_visual_tokens():
    spec = get_strategy("cdpruner")
    assert spec.stage == "vision" and spec.text and spec.features == "llm"
    assert spec.needs == frozenset({"features"})
    cfg = CDPrunerConfig(keep=0.25)
    assert spec.requests(cfg, None) == []
    f, txt = rand_case(1, 16, 8, 3)
    sel = spec.select(cfg, VisualTokens(grid=(4, 4), features=f, text=txt), 4, None)
    assert sel.features is None and sel.groups is None                    # text=True: no merging
    assert torch.equal(sel.indices, cdpruner_select(f, txt, 4))
    sel0 = spec.select(cfg, VisualTokens(grid=(4, 4), features=f, text=torch.zeros(0, 8)), 4, None)
    assert torch.equal(sel0.indices, cdpruner_select(f, None, 4))
    batch = spec.select_batch(cfg, VisualTokens(grid=(4, 4), features=f.expand(2, 16, 8).clone(),
                                                text=txt.expand(2, 3, 8).clone()), 4, None)
    assert all(torch.equal(s.indices, sel.indices) for s in batch)
