"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): drop visual tokens inside the LLM.

Layers 0..K-1 see every token; the attention row of the last prompt token at layer K-1
(heads averaged, as the official code; the paper text describes a mean over all queries) ranks
each image's visual tokens; layers K.. see only the kept ones, which keep their original
positions. With a KV cache the pruning happens once, at prefill (the KV cache of layers >= K
holds only kept tokens). Deviation: with ``use_cache=False`` the official no-cache code re-ranks on
every step from the newest token; the engine keeps the prefill's selection instead, so
``use_cache`` changes speed, not answers. The budget is per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, PruneConfig, check_range
from ..registry import register_strategy
from .base import LLMInfo, LLMTokens, StrategySpec, topk_indices


@dataclass(frozen=True)
class FastVConfig(PruneConfig):
    """``layer``: K, the 0-based decoder layer from which visual tokens are dropped (paper: 2)."""

    name = "fastv"
    layer: int = 2

    def validate(self) -> None:
        check_range("layer", self.layer, 1, 10**6, integer=True)


def fastv_layer(cfg: FastVConfig, info: LLMInfo) -> int:
    if cfg.layer >= info.num_layers:
        raise ConfigError(
            f"layer={cfg.layer} is out of range for an LLM of {info.num_layers} layers; "
            f"use 1..{info.num_layers - 1}"
        )
    return cfg.layer


def fastv_select(last_row: torch.Tensor, n_keep: int) -> torch.Tensor:
    """last_row [N]: attention of the last prompt token to one image's tokens -> kept, ascending."""
    return torch.sort(topk_indices(last_row, n_keep)).values


def attention_row(tokens: LLMTokens) -> torch.Tensor:
    """The last prompt token's attention row (the signal FastV-style rules rank by)."""
    assert tokens.attention is not None
    return tokens.attention


SPEC = register_strategy(StrategySpec(
    name="fastv", config_cls=FastVConfig, stage="llm", needs=frozenset({"llm_attention"}),
    llm_layer=fastv_layer, select_llm=lambda cfg, tokens, n: fastv_select(attention_row(tokens), n),
    paper="Chen et al. 2024, FastV, ECCV 2024, arXiv 2403.06764",
))
