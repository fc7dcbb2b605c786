"""A scratch inner-LLM strategy: FastV's ablation that keeps the *least* attended visual tokens.

One file; the entry point names its ``SPEC`` (a StrategySpec), which the registry registers."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import PruneConfig
from tokenprune.config import check_range
from tokenprune.strategies.base import LLMTokens, StrategySpec, topk_indices


@dataclass(frozen=True)
class InverseFastVConfig(PruneConfig):
    """``layer``: K, the decoder layer from which tokens are dropped (scores from K-1)."""

    name = "inverse_fastv"
    layer: int = 1

    def validate(self) -> None:
        check_range("layer", self.layer, 1, 10**6, integer=True)


def select_llm(cfg: InverseFastVConfig, tokens: LLMTokens, n_keep: int) -> torch.Tensor:
    """``tokens.attention`` [N]: the last prompt token's attention to one image's tokens -> the
    n_keep lowest."""
    assert tokens.attention is not None
    return topk_indices(-tokens.attention.float(), n_keep)


SPEC = StrategySpec(name="inverse_fastv", config_cls=InverseFastVConfig, stage="llm",
                    needs=frozenset({"llm_attention"}),
                    llm_layer=lambda cfg, info: min(cfg.layer, info.num_layers - 1),
                    select_llm=select_llm, paper="example plugin (FastV's inverse ablation)")
