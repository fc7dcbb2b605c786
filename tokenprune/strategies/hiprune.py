"""HiPrune (Liu et al., 2025, arXiv 2508.00553): anchor, buffer and register tokens.

Anchors are the tokens that receive most attention in a middle ("object") layer of the vision
encoder; buffers are their cross neighbours (flat index +-1, +-grid width, as the official code:
+-1 wraps across rows); registers fill the rest of the budget by the attention received in the
feature layer. Scores are head-mean, query-mean attention received (CLS column dropped).

Deviation from the official code: chosen anchor/buffer tokens are masked with -inf before the
register top-k (the official Qwen path subtracts 1 from summed scores, which can pick a token
twice and return fewer tokens than the budget). Ties are broken by the lower index.
If anchors+buffers alone exceed the budget (tiny budgets with alpha near 1), anchors are kept
and buffers are taken by feature-layer score until the budget is met.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, PruneConfig, check_range
from ..registry import register_strategy
from .base import ScoreRequest, Selection, StrategySpec, VisionInfo, VisualTokens, mask_to_indices, rank_desc, topk_indices

#: the paper's object layer for a 24-layer CLIP ViT-L (1-based)
PAPER_OBJECT_LAYER = 9
PAPER_DEPTH = 24


@dataclass(frozen=True)
class HiPruneConfig(PruneConfig):
    """``alpha``: anchor share (n_anchor = round(budget*alpha/5)); ``object_layer``: 1-based
    encoder layer of the anchors (None: 9 for a 24-layer encoder, scaled to 9/24 of the depth)."""

    name = "hiprune"
    alpha: float = 0.1
    object_layer: int | None = None

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0, lo_open=True)
        if self.object_layer is not None:
            check_range("object_layer", self.object_layer, 1, 10_000, integer=True)


def default_object_layer(num_layers: int) -> int:
    """1-based object layer: the paper's 9-of-24 scaled to ``num_layers`` (rounded, >= 1)."""
    return max(1, round(PAPER_OBJECT_LAYER * num_layers / PAPER_DEPTH))


def object_layer_index(cfg: HiPruneConfig, info: VisionInfo) -> int:
    layer = cfg.object_layer if cfg.object_layer is not None else (
        info.object_layer if info.object_layer is not None else default_object_layer(info.num_layers))
    if layer > info.num_layers:
        raise ConfigError(
            f"object_layer={layer} is out of range for a vision encoder of {info.num_layers} layers; "
            f"use 1..{info.num_layers}"
        )
    return layer - 1


def cross_neighbours(anchors: torch.Tensor, n_tokens: int, width: int) -> torch.Tensor:
    """Anchors plus their +-1 and +-width flat neighbours, clamped to [0, n_tokens-1], unique, sorted."""
    cand = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width])
    return torch.unique(cand.clamp(0, n_tokens - 1))


def hiprune_select(score_object: torch.Tensor, score_deep: torch.Tensor, n_keep: int,
                   grid_width: int, alpha: float) -> torch.Tensor:
    """Kept indices (ascending) of one image.

    score_object, score_deep: [N] attention received in the object / feature layer.
    """
    n_tokens = score_object.numel()
    n_anchor = round(n_keep * alpha / 5)  # Python round, as the official code
    anchors = topk_indices(score_object, n_anchor)
    anchor_buffer = cross_neighbours(anchors, n_tokens, grid_width)
    deep = score_deep.detach().float().clone()
    if anchor_buffer.numel() > n_keep:
        buffers = anchor_buffer[~torch.isin(anchor_buffer, anchors)]
        anchors = anchors[:n_keep]
        extra = buffers[topk_indices(deep[buffers], n_keep - anchors.numel())]
        return torch.sort(torch.cat([anchors, extra])).values
    deep[anchor_buffer] = float("-inf")
    registers = topk_indices(deep, n_keep - anchor_buffer.numel())
    return torch.sort(torch.cat([anchor_buffer, registers])).values


def hiprune_select_batch(score_object: torch.Tensor, score_deep: torch.Tensor, n_keep: int,
                         grid_width: int, alpha: float) -> torch.Tensor:
    """:func:`hiprune_select` for a batch: [B, N] scores -> [B, n_keep] ascending indices, the same
    tokens row by row (tested), with masks instead of per-image ``unique`` (no host sync)."""
    n = score_object.shape[1]
    n_anchor = round(n_keep * alpha / 5)
    rank_obj = rank_desc(score_object)
    anchor = rank_obj < n_anchor                                            # [B, N]
    shifted = torch.zeros_like(anchor)
    for d in (1, grid_width):                        # cross neighbours a +- d, clamped to [0, N-1]
        d = min(d, n)
        shifted[:, d:] |= anchor[:, :n - d]          # a + d < N
        shifted[:, n - 1] |= anchor[:, n - d:].any(1)   # a + d >= N -> N-1
        shifted[:, :n - d] |= anchor[:, d:]          # a - d >= 0
        shifted[:, 0] |= anchor[:, :d].any(1)        # a - d < 0 -> 0
    ab = anchor | shifted
    count = ab.sum(1, keepdim=True)
    deep = score_deep.float()
    ninf = torch.full_like(deep, float("-inf"))
    # normal case: anchors + buffers + the best remaining tokens by feature-layer score
    normal = ab | (rank_desc(torch.where(ab, ninf, deep)) < (n_keep - count))
    # overflow (anchors + buffers > budget): the first n_keep anchors, then the best buffers
    n_anc = min(n_anchor, n_keep)
    first_anchors = rank_obj < n_anc
    buffers = ab & ~anchor
    over = first_anchors | (rank_desc(torch.where(buffers, deep, ninf)) < (n_keep - n_anc))
    over &= first_anchors | buffers
    keep = torch.where(count > n_keep, over, normal)
    return mask_to_indices(keep, n_keep)


def _requests(cfg: HiPruneConfig, info: VisionInfo) -> list[ScoreRequest]:
    return [ScoreRequest(object_layer_index(cfg, info), "mean"), ScoreRequest(info.feature_layer, "mean")]


def _select(cfg: HiPruneConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    obj = tokens.scores[(object_layer_index(cfg, info), "mean")]
    deep = tokens.scores[(info.feature_layer, "mean")]
    return Selection(hiprune_select(obj, deep, n_keep, tokens.grid[1], cfg.alpha))


def _select_batch(cfg: HiPruneConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> list[Selection]:
    obj = tokens.scores[(object_layer_index(cfg, info), "mean")]
    deep = tokens.scores[(info.feature_layer, "mean")]
    return [Selection(i) for i in hiprune_select_batch(obj, deep, n_keep, tokens.grid[1], cfg.alpha)]


SPEC = register_strategy(StrategySpec(
    name="hiprune", config_cls=HiPruneConfig, stage="vision",
    needs=frozenset({"mean_attention"}), requests=_requests, select=_select, select_batch=_select_batch,
    paper="Liu et al. 2025, HiPrune, arXiv 2508.00553",
))
