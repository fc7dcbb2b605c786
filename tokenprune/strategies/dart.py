"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494): inside the LLM at layer K, keep the visual tokens
*least duplicated* by a few pivot tokens. Needs no attention weights.

As the official code (LLaVA-1.5 and Qwen2-VL paths): layers 0..K-1 see every token; pivots are
the ``pivot_image`` visual tokens and the ``pivot_text`` text tokens after the image with the
largest L1 norm of layer K-1's keys (rotary applied, heads concatenated); every pivot in turn takes
the candidates whose hidden state (layer K-1's output, through the LLM's final norm) has the
*lowest* cosine similarity to its own, each taken out of the pool, so no token is picked twice;
image pivots are kept, text pivots are not visual tokens. Kept tokens keep their positions.

Deviations (exact budgets, determinism): the official per-pivot count is floor(M / pivots), so
LLaVA-1.5 keeps ``pivot_image + pivots*floor(M/pivots)`` (132 for M = 128); here the budget minus
the image pivots is split over the pivots (the first ones take one more), so exactly ``n_keep``
are kept. The official loop visits the pivots in Python set order (an accident of hashing); here
image pivots go first, then text pivots, each by descending key norm. With fewer text tokens than
``pivot_text`` the official code raises; here every text token is a pivot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError, PruneConfig, check_range
from ..registry import register_strategy
from .base import LLMInfo, LLMTokens, StrategySpec, topk_indices


@dataclass(frozen=True)
class DARTConfig(PruneConfig):
    """``layer``: K, the 0-based decoder layer from which visual tokens are dropped (paper: 2);
    ``pivot_image`` / ``pivot_text``: pivot tokens of each kind (paper: 4 and 4)."""

    name = "dart"
    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4

    def validate(self) -> None:
        check_range("layer", self.layer, 1, 10**6, integer=True)
        check_range("pivot_image", self.pivot_image, 0, 10**6, integer=True)
        check_range("pivot_text", self.pivot_text, 0, 10**6, integer=True)
        if self.pivot_image + self.pivot_text < 1:
            raise ConfigError("dart needs at least one pivot (pivot_image + pivot_text >= 1)")


def dart_layer(cfg: DARTConfig, info: LLMInfo) -> int:
    if cfg.layer >= info.num_layers:
        raise ConfigError(f"layer={cfg.layer} is out of range for an LLM of {info.num_layers} layers; "
                          f"use 1..{info.num_layers - 1}")
    return cfg.layer


def dart_select(keys: torch.Tensor, text_keys: torch.Tensor, hidden: torch.Tensor, text_hidden: torch.Tensor,
                n_keep: int, pivot_image: int = 4, pivot_text: int = 4) -> torch.Tensor:
    """keys [N, C] / text_keys [T, C]: layer K-1's keys of one image's candidates and of the text
    after it; hidden [N, D] / text_hidden [T, D]: their (normed) hidden states -> [n_keep] kept
    indices, ascending. Ties go to the lower index."""
    n = keys.shape[0]
    n_keep = max(0, min(n_keep, n))
    n_img = min(pivot_image, n_keep)
    img_piv = topk_indices(keys.float().abs().sum(-1), n_img)
    txt_piv = topk_indices(text_keys.float().abs().sum(-1), min(pivot_text, text_keys.shape[0]))
    h = F.normalize(hidden.float(), dim=-1)
    pivots = torch.cat([h[img_piv], F.normalize(text_hidden.float(), dim=-1)[txt_piv]])
    chosen = torch.zeros(n, dtype=torch.bool, device=keys.device)
    chosen[img_piv] = True
    rest, p = n_keep - n_img, pivots.shape[0]
    if rest > 0 and p == 0:      # no pivot at all (no image pivot asked, no text): nothing to compare
        raise ConfigError("dart has no pivot for this image (pivot_image=0 and no text after it)")
    for i in range(p):
        count = rest // p + (1 if i < rest % p else 0)
        if count == 0:
            continue
        sim = h @ pivots[i]                                   # [N] cosine to this pivot
        sim = sim.masked_fill(chosen, float("inf"))          # taken tokens are out of the pool
        chosen[topk_indices(-sim, count)] = True
    return torch.nonzero(chosen).flatten()


def _select(cfg: DARTConfig, tokens: LLMTokens, n_keep: int) -> torch.Tensor:
    assert tokens.keys is not None and tokens.text_keys is not None
    assert tokens.hidden is not None and tokens.text_hidden is not None
    hidden, text = tokens.hidden, tokens.text_hidden
    if tokens.final_norm is not None:
        hidden, text = tokens.final_norm(hidden), tokens.final_norm(text)
    return dart_select(tokens.keys, tokens.text_keys, hidden, text, n_keep, cfg.pivot_image, cfg.pivot_text)


SPEC = register_strategy(StrategySpec(
    name="dart", config_cls=DARTConfig, stage="llm", needs=frozenset({"llm_attention"}),
    llm_layer=dart_layer, select_llm=_select, llm_signals=frozenset({"keys", "hidden"}),
    paper="Wen et al. 2025, DART, arXiv 2502.11494",
))
