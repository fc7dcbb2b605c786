"""A scratch vision-stage strategy: keep each image's tokens with the largest feature norm.

One file; the entry point names this module, and importing it registers the strategy."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import PruneConfig, register_strategy
from tokenprune.strategies.base import Selection, StrategySpec, VisionInfo, VisualTokens, topk_indices


@dataclass(frozen=True)
class NormPruneConfig(PruneConfig):
    name = "norm_prune"


def select(cfg: NormPruneConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    """features [N, D] -> the n_keep rows of largest L2 norm, ascending."""
    assert tokens.features is not None
    norm = tokens.features.float().norm(dim=-1)
    return Selection(torch.sort(topk_indices(norm, n_keep)).values)


SPEC = register_strategy(StrategySpec(
    name="norm_prune", config_cls=NormPruneConfig, stage="vision", needs=frozenset({"features"}),
    requests=lambda cfg, info: [], select=select, paper="example plugin"))
