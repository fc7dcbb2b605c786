"""DivPrune: the greedy max–min cosine-diversity rule against hand-computed cases and a slow
re-implementation, exact budgets, ties, batching, the large-N path, and (LLaVA-1.5) selection on
the projector output, i.e. in the LLM's width."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tokenprune.strategies import divprune as dp
from tokenprune.strategies.divprune import DivPruneConfig, divprune_select, divprune_select_batch


def slow_divprune(features: torch.Tensor, n_keep: int) -> list[int]:
    """The paper's greedy written plainly, in float64 cosine *distances*: first the token whose
    distance to its nearest other token is largest, then repeatedly the unchosen token whose
    smallest distance to the chosen ones is largest; ties to the lower index."""
    x = features.double()
    n = x.shape[0]
    d = [[1.0 - float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0)) for j in range(n)]
         for i in range(n)]
    best, first = -math.inf, 0
    for i in range(n):
        nn = min((d[i][j] for j in range(n) if j != i), default=math.inf)
        if nn > best:
            best, first = nn, i
    chosen = [first]
    while len(chosen) < n_keep:
        best, pick = -math.inf, None
        for i in range(n):
            if i in chosen:
                continue
            m = min(d[i][j] for j in chosen)
            if m > best:
                best, pick = m, i
        chosen.append(pick)
    return sorted(chosen)


def on_circle(degrees: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


# --- the rule -------------------------------------------------------------------------------------
def test_hand_computed_order_on_the_circle():
    """Unit vectors at 0, 5, 10, 100, 200 degrees (cosine distance grows with the angle up to 180):
    nearest-other angles are 5, 5, 5, 90, 100 -> first 200 (index 4, the most isolated); then
    farthest from {200}: 10 (170 deg); from {200, 10}: 100 (90 deg); then 0 (10 deg) before 5 (5 deg)."""
    f = on_circle([0, 5, 10, 100, 200])
    assert divprune_select(f, 1).tolist() == [4]
    assert divprune_select(f, 2).tolist() == [2, 4]
    assert divprune_select(f, 3).tolist() == [2, 3, 4]
    assert divprune_select(f, 4).tolist() == [0, 2, 3, 4]
    assert divprune_select(f, 5).tolist() == [0, 1, 2, 3, 4]


def test_first_pick_is_the_most_isolated_token_not_the_farthest_pair():
    """A far pair (0 and 180 deg, each with a close twin) and a lone token at 90 deg: the lone
    token's nearest neighbour is 80 deg away, larger than anyone else's (10 deg), so it goes first."""
    f = on_circle([0, 10, 90, 180, 190])
    assert divprune_select(f, 1).tolist() == [2]


def test_cosine_not_euclidean_scale_is_ignored():
    f = on_circle([0, 5, 10, 100, 200]) * torch.tensor([[1.0], [100.0], [0.01], [3.0], [7.0]])
    assert divprune_select(f, 3).tolist() == [2, 3, 4]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n,d,k", [(12, 3, 5), (30, 8, 10), (49, 16, 1), (49, 16, 20), (20, 4, 20)])
def test_same_set_as_the_slow_reference(seed, n, d, k):
    f = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    assert divprune_select(f, k).tolist() == slow_divprune(f, k)


def test_selected_set_is_more_diverse_than_random_subsets():
    """The selected set's smallest pairwise distance is never 0 on random data and is far above a
    random subset's (what the method is for)."""
    g = torch.Generator().manual_seed(3)
    f = torch.randn(200, 16, generator=g)
    x = torch.nn.functional.normalize(f, dim=-1)

    def min_dist(idx):
        s = x[idx] @ x[idx].T
        s.fill_diagonal_(-1.0)
        return float(1 - s.max())

    ours = min_dist(divprune_select(f, 20))
    rand = max(min_dist(torch.randperm(200, generator=g)[:20]) for _ in range(50))
    assert ours > rand > 0


# --- budgets, ties, edge cases --------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 7, 63, 64])
def test_exact_budget_ascending_unique(k):
    f = torch.randn(64, 8, generator=torch.Generator().manual_seed(k))
    idx = divprune_select(f, k)
    assert idx.dtype == torch.long and idx.numel() == k and torch.equal(idx, torch.unique(idx))
    if k == 64:
        assert idx.tolist() == list(range(64))


def test_identical_tokens_tie_to_the_lowest_indices():
    f = torch.ones(10, 4)
    assert divprune_select(f, 1).tolist() == [0]
    assert divprune_select(f, 4).tolist() == [0, 1, 2, 3]


def test_duplicates_are_never_picked_twice():
    """Three copies of a and one b orthogonal to it: b first (isolated), then a's copies in index
    order, although every remaining copy is at distance 0 from the chosen one."""
    a, b = [1.0, 0.0], [0.0, 1.0]
    f = torch.tensor([a, a, a, b])
    assert divprune_select(f, 2).tolist() == [0, 3]
    assert divprune_select(f, 4).tolist() == [0, 1, 2, 3]


def test_zero_and_single_tokens():
    assert divprune_select(torch.zeros(5, 3), 3).tolist() == [0, 1, 2]   # all similarities 0: ties
    assert divprune_select(torch.randn(1, 3), 1).tolist() == [0]
    f = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    f[2] = 0.0                                                            # a zero row is 'far' from all
    assert 2 in divprune_select(f, 2).tolist()


def test_bad_budget_and_shape_raise():
    with pytest.raises(ValueError):
        divprune_select(torch.randn(4, 2), 0)
    with pytest.raises(ValueError):
        divprune_select(torch.randn(4, 2), 5)
    with pytest.raises(ValueError):
        divprune_select_batch(torch.randn(4, 2), 2)


def test_deterministic_and_dtype_independent():
    f = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    a = divprune_select(f, 12)
    assert torch.equal(a, divprune_select(f.clone(), 12))
    assert torch.equal(a, divprune_select(f.double(), 12))   # computed in float32 either way


# --- batching and the large-N path ----------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 24])
def test_batch_equals_one_by_one(k):
    f = torch.randn(5, 24, 16, generator=torch.Generator().manual_seed(k))
    f[3] = f[1]                                   # equal images in one batch get equal sets
    batched = divprune_select_batch(f, k)
    assert batched.shape == (5, k)
    for i in range(5):
        assert torch.equal(batched[i], divprune_select(f[i], k))
    assert torch.equal(batched[3], batched[1])


@pytest.mark.parametrize("limit", [0, 100, 24 * 24 * 3 - 1])
def test_row_block_path_equals_the_stored_matrix(monkeypatch, limit):
    f = torch.randn(3, 24, 16, generator=torch.Generator().manual_seed(limit))
    want = divprune_select_batch(f, 9)
    monkeypatch.setattr(dp, "MAX_SIM_ELEMENTS", limit)
    assert torch.equal(divprune_select_batch(f, 9), want)
    assert torch.equal(divprune_select(f[0], 24), torch.arange(24))


def test_spec_wiring_and_config():
    from tokenprune import registry
    from tokenprune.strategies.base import VisualTokens

    spec = registry.get_strategy("divprune")
    assert spec.stage == "vision" and spec.features == "llm" and spec.needs == frozenset({"features"})
    assert spec.requests(DivPruneConfig(keep=0.098), None) == []
    assert DivPruneConfig(keep=0.098).tokens_for(576) == 56          # the official default ratio
    assert DivPruneConfig.param_names() == ["keep", "budget", "positions"]
    f = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    sels = spec.select_batch(DivPruneConfig(budget=4), VisualTokens(grid=(4, 4), features=f), 4, None)
    one = spec.select(DivPruneConfig(budget=4), VisualTokens(grid=(4, 4), features=f[1]), 4, None)
    assert torch.equal(sels[1].indices, one.indices) and one.features is None and one.groups is None


# --- LLaVA-1.5: selection happens on the projector output (LLM width) ------------------------------
def test_llava_selects_on_the_projector_output(monkeypatch):
    """The features the strategy sees on LLaVA-1.5 have the LLM's hidden width (not CLIP's), and
    the kept set is DivPrune of the unpatched ``multi_modal_projector`` output itself."""
    from tokenprune import api, registry
    from tokenprune.testing import builtin_cases

    case = builtin_cases()[0]
    assert case.name == "llava"
    model = case.build()
    inp = case.inputs(0)
    width, clip_width = model.config.text_config.hidden_size, model.config.vision_config.hidden_size
    assert width != clip_width

    proj: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: proj.append(o.detach().clone()))
    with torch.no_grad():
        model(**inp)
    hook.remove()

    spec = registry.get_strategy("divprune")
    seen: list[tuple[int, ...]] = []

    def spy_select(cfg, tok, n, info):
        seen.append(tuple(tok.features.shape))
        return spec.select(cfg, tok, n, info)

    def spy_batch(cfg, tok, n, info):
        seen.append(tuple(tok.features.shape))
        return spec.select_batch(cfg, tok, n, info)

    spy = dataclasses.replace(spec, select=spy_select, select_batch=spy_batch)
    monkeypatch.setitem(registry._STRATEGIES, "divprune", spy)
    monkeypatch.setitem(registry._BY_CONFIG, DivPruneConfig, spy)

    with api.apply(model, "divprune", keep=0.3) as h:
        with torch.no_grad():
            model(**inp)
        kept = h.last_stats.kept_indices[0]
        n_keep = h.config.tokens_for(proj[0].shape[-2])
    assert seen and all(s[-1] == width for s in seen)
    assert len(kept) == 1 and kept[0].numel() == n_keep
    assert torch.equal(kept[0].cpu(), divprune_select(proj[0].reshape(-1, proj[0].shape[-2], width)[0], n_keep))
