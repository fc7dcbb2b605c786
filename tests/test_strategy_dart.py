"""DART's rule (pure function) against a slow loop written from the official description, and
its config; the engine side (keys and hidden states of layer K-1, every family) runs in the kit."""
from __future__ import annotations

import pytest
import torch

from tokenprune.config import ConfigError
from tokenprune.strategies.dart import DARTConfig, dart_select


def slow_dart(keys, text_keys, hidden, text_hidden, n_keep, p_img=4, p_txt=4):
    """Pivots by key L1 norm (image first, then text, each by descending norm, ties: lower index);
    each pivot takes its share of the remaining budget, least cosine-similar first, from the pool."""
    n = keys.shape[0]
    norms = [float(keys[i].abs().sum()) for i in range(n)]
    img = sorted(range(n), key=lambda i: (-norms[i], i))[:min(p_img, n_keep)]
    tn = [float(text_keys[i].abs().sum()) for i in range(text_keys.shape[0])]
    txt = sorted(range(len(tn)), key=lambda i: (-tn[i], i))[:p_txt]
    pivots = [hidden[i] for i in img] + [text_hidden[i] for i in txt]
    chosen = set(img)
    rest = n_keep - len(img)
    for j, v in enumerate(pivots):
        count = rest // len(pivots) + (1 if j < rest % len(pivots) else 0)
        pool = [i for i in range(n) if i not in chosen]
        sims = {i: float(torch.nn.functional.cosine_similarity(hidden[i], v, dim=0)) for i in pool}
        for i in sorted(pool, key=lambda i: (sims[i], i))[:count]:
            chosen.add(i)
    return sorted(chosen)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_keep", [1, 3, 4, 9, 17, 40])
def test_matches_the_slow_loop_and_keeps_exactly(seed, n_keep):
    g = torch.Generator().manual_seed(seed)
    keys, hidden = torch.randn(40, 12, generator=g), torch.randn(40, 16, generator=g)
    tk, th = torch.randn(7, 12, generator=g), torch.randn(7, 16, generator=g)
    got = dart_select(keys, tk, hidden, th, n_keep)
    assert got.tolist() == slow_dart(keys, tk, hidden, th, n_keep)
    assert got.numel() == n_keep and torch.equal(got, torch.unique(got))


def test_image_pivots_are_kept_and_the_least_duplicated_tokens_chosen():
    # 6 tokens: 0 is the pivot (largest key norm); 1-4 duplicate it, 5 is orthogonal to it
    keys = torch.tensor([[9.0], [1], [1], [1], [1], [1]])
    hidden = torch.tensor([[1.0, 0], [1, 0.01], [1, 0.02], [1, 0.03], [1, 0.04], [0, 1]])
    got = dart_select(keys, torch.zeros(0, 1), hidden, torch.zeros(0, 2), 2, pivot_image=1, pivot_text=0)
    assert got.tolist() == [0, 5]


def test_text_pivots_pick_but_are_not_kept():
    g = torch.Generator().manual_seed(0)
    keys, hidden = torch.randn(10, 4, generator=g), torch.randn(10, 6, generator=g)
    th = torch.randn(3, 6, generator=g)
    got = dart_select(keys, torch.randn(3, 4, generator=g), hidden, th, 5, pivot_image=0, pivot_text=2)
    assert got.numel() == 5       # only visual candidates are returned
    with pytest.raises(ConfigError):   # no pivot at all: nothing to measure duplication against
        dart_select(keys, torch.zeros(0, 4), hidden, torch.zeros(0, 6), 5, pivot_image=0, pivot_text=2)


def test_fewer_text_tokens_than_pivots_and_full_budget():
    g = torch.Generator().manual_seed(1)
    keys, hidden = torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g)
    got = dart_select(keys, torch.randn(2, 4, generator=g), hidden, torch.randn(2, 6, generator=g), 8)
    assert got.tolist() == list(range(8))


def test_config_ranges():
    DARTConfig(keep=0.25, layer=3, pivot_image=0, pivot_text=1)
    for bad in ({"layer": 0}, {"pivot_image": -1}, {"pivot_image": 0, "pivot_text": 0}):
        with pytest.raises(ConfigError):
            DARTConfig(keep=0.25, **bad)
