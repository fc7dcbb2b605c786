"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): drop visual tokens inside the LLM in
several stages, each keeping a fraction λ of the previous one, ranked by the last instruction
token's attention.

As the official code: stages at layers 8, 16 and 24 of a 32-layer LLM (scaled here to the depth),
λ = 0.5, so an image of N tokens has N, N/2, N/4, N/8 tokens in the four layer groups (counts
floored); at each stage only the survivors are re-ranked, by the head-mean softmax row of the
last prompt token (softmax over every key it sees), and the top ones are kept.

Budget: ``keep`` is λ, the fraction every stage keeps of the one before (``keep=0.5`` is the
official schedule): stage s keeps floor(N * λ^(s+1)) (stage 0: ``keep``'s usual rounding);
``budget`` = B is what the first stage keeps, with λ = B / N. ``last_stats.stages`` says what each
stage kept.

Deviations: the official code ranks with layer K_s's own q/k projections re-run on layer K_s-1's
output, before layer K_s runs; here the ranking comes from layer K_s-1's attention (the engine's
rule for every inner stage, as FastV), computed from its hooked q/k. The official code renumbers the
survivors' positions after each drop; here kept tokens keep their original positions (as FastV and
DART do), so no layer sees positions the cache does not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, PruneConfig
from ..registry import register_strategy
from .base import LLMInfo, LLMTokens, StrategySpec, scaled_layers, topk_indices

#: the official stage layers and the depth they are given for (LLaVA-1.5-7B)
PAPER_LAYERS = (8, 16, 24)
PAPER_DEPTH = 32


@dataclass(frozen=True)
class PDropConfig(PruneConfig):
    """``layers``: the first decoder layer of each stage, increasing (None: 8/16/24 of 32, scaled
    to the depth, leaving out stages a shallow LLM has no room for; also "8,16,24" as text). The
    per-stage ratio λ is ``keep`` (paper: 0.5)."""

    name = "pdrop"
    layers: tuple[int, ...] | None = None

    def validate(self) -> None:
        if self.layers is not None:
            raw = self.layers
            if isinstance(raw, str):
                try:
                    raw = tuple(int(x) for x in raw.replace(" ", "").split(",") if x)
                except ValueError:
                    raise ConfigError(f"layers must be integers like '8,16,24'; got {self.layers!r}") from None
            if isinstance(raw, int):
                raw = (raw,)
            layers = tuple(raw)
            if not layers or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in layers) \
                    or any(b <= a for a, b in zip(layers, layers[1:])):
                raise ConfigError(f"layers must be increasing integers >= 1; got {self.layers!r}")
            object.__setattr__(self, "layers", layers)


def pdrop_layers(cfg: PDropConfig, info: LLMInfo) -> list[int]:
    if cfg.layers is None:
        return scaled_layers(PAPER_LAYERS, PAPER_DEPTH, info)
    if cfg.layers[-1] >= info.num_layers:
        raise ConfigError(f"layers={list(cfg.layers)} is out of range for an LLM of {info.num_layers} "
                          f"layers; use 1..{info.num_layers - 1}")
    return list(cfg.layers)


def pdrop_budget(cfg: PDropConfig, stage: int, first: int, n_in: int) -> int:
    """Tokens stage ``stage`` keeps of an image of ``n_in`` tokens whose first stage keeps
    ``first``: floor(first * λ^s) with λ = first / n_in (an integer product, so 0.5 of 576 gives
    exactly 288, 144, 72)."""
    return first if stage == 0 or n_in == 0 else (first ** (stage + 1)) // (n_in ** stage)


def pdrop_select(last_row: torch.Tensor, n_keep: int) -> torch.Tensor:
    """last_row [N]: the last prompt token's attention to the surviving tokens -> the n_keep most
    attended (ties: the lower index)."""
    return topk_indices(last_row, n_keep)


def _select(cfg: PDropConfig, tokens: LLMTokens, n_keep: int) -> torch.Tensor:
    assert tokens.attention is not None
    return pdrop_select(tokens.attention, n_keep)


SPEC = register_strategy(StrategySpec(
    name="pdrop", config_cls=PDropConfig, stage="llm", needs=frozenset({"llm_attention"}),
    llm_layer=pdrop_layers, select_llm=_select, llm_budget=pdrop_budget,
    paper="Xing et al. 2025, PyramidDrop, CVPR 2025, arXiv 2410.17247",
))
