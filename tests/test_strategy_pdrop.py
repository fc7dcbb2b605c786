"""PyramidDrop's schedule, layers and rule (pure functions); the multi-stage engine (nested kept
sets, lengths at every stage, exact counts, every family) runs in the kit and the LLaVA by-hand tests."""
from __future__ import annotations

import pytest
import torch

from tokenprune.config import ConfigError
from tokenprune.strategies.base import LLMInfo
from tokenprune.strategies.pdrop import PDropConfig, pdrop_budget, pdrop_layers, pdrop_select


def test_official_schedule_576_288_144_72():
    cfg = PDropConfig(keep=0.5)
    first = cfg.tokens_for(576)
    assert [pdrop_budget(cfg, s, first, 576) for s in range(3)] == [288, 144, 72]


def test_budget_sets_lambda_and_keep_one_keeps_everything():
    cfg = PDropConfig(budget=192)
    assert [pdrop_budget(cfg, s, 192, 576) for s in range(3)] == [192, 64, 21]   # lambda = 1/3, floored
    one = PDropConfig(keep=1.0)
    assert [pdrop_budget(one, s, 576, 576) for s in range(3)] == [576, 576, 576]


def test_layers_scale_to_the_depth_and_explicit_ones_are_checked():
    assert pdrop_layers(PDropConfig(keep=0.5), LLMInfo(32)) == [8, 16, 24]
    assert pdrop_layers(PDropConfig(keep=0.5), LLMInfo(28)) == [7, 14, 21]
    assert pdrop_layers(PDropConfig(keep=0.5), LLMInfo(4)) == [1, 2, 3]
    assert pdrop_layers(PDropConfig(keep=0.5), LLMInfo(3)) == [1, 2]            # no room for a third stage
    assert pdrop_layers(PDropConfig(keep=0.5), LLMInfo(8, min_layer=3)) == [3, 4, 6]  # after DeepStack's layers
    assert pdrop_layers(PDropConfig(keep=0.5, layers="2,5"), LLMInfo(8)) == [2, 5]
    assert PDropConfig(keep=0.5, layers=[2, 5]).layers == (2, 5)
    with pytest.raises(ConfigError):
        pdrop_layers(PDropConfig(keep=0.5, layers=(2, 9)), LLMInfo(8))
    for bad in ("5,2", "a,b", (0, 1), (2, 2)):
        with pytest.raises(ConfigError):
            PDropConfig(keep=0.5, layers=bad)


def test_rank_by_the_last_rows_attention_ties_to_the_lower_index():
    row = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.9])
    assert sorted(pdrop_select(row, 3).tolist()) == [1, 2, 4]
    assert sorted(pdrop_select(torch.ones(5), 2).tolist()) == [0, 1]
