"""FoPru, focal pruning (Jiang et al., 2024, arXiv 2411.14164).

No official code exists. What we chose (after the paper's abstract and the only public port):
token significance = attention each patch *receives* at the feature layer, averaged over heads
and all query rows (softmax probabilities; the port's variance test between "received" and
"given" always picks "received" once true softmax rows are used, since every row sums to 1).

* ``mode="rank"``: keep the globally most significant tokens.
* ``mode="row"``: rank grid rows by the sum of their significance and keep whole rows; when the
  budget is not a multiple of the grid width, the remainder comes from the next-ranked row, its
  most significant tokens. Kept tokens are returned in original (raster) order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, PruneConfig
from ..registry import register_strategy
from .base import ScoreRequest, Selection, StrategySpec, VisionInfo, VisualTokens, mask_to_indices, rank_desc, topk_indices

MODES = ("rank", "row")


@dataclass(frozen=True)
class FoPruConfig(PruneConfig):
    name = "fopru"
    mode: str = "rank"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}; got {self.mode!r}")


def fopru_rank(significance: torch.Tensor, n_keep: int) -> torch.Tensor:
    """[N] -> kept indices [n_keep], ascending."""
    return torch.sort(topk_indices(significance, n_keep)).values


def fopru_rank_batch(significance: torch.Tensor, n_keep: int) -> torch.Tensor:
    """[B, N] -> [B, n_keep] ascending: :func:`fopru_rank` for every row at once."""
    return mask_to_indices(rank_desc(significance) < n_keep, n_keep)


def fopru_row(significance: torch.Tensor, n_keep: int, grid: tuple[int, int]) -> torch.Tensor:
    """[N] over an (h, w) grid -> kept indices [n_keep], ascending, whole rows first."""
    h, w = grid
    sig = significance.reshape(h, w)
    rows = topk_indices(sig.sum(dim=1), h)
    n_full, rest = divmod(n_keep, w)
    cols = torch.arange(w, device=sig.device)
    parts = [(rows[:n_full, None] * w + cols[None]).reshape(-1)]
    if rest:
        r = rows[n_full]
        parts.append(r * w + topk_indices(sig[r], rest))
    return torch.sort(torch.cat(parts)).values


def _requests(cfg: FoPruConfig, info: VisionInfo) -> list[ScoreRequest]:
    return [ScoreRequest(info.feature_layer, "mean")]


def _select(cfg: FoPruConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    sig = tokens.scores[(info.feature_layer, "mean")]
    if cfg.mode == "rank":
        return Selection(fopru_rank(sig, n_keep))
    return Selection(fopru_row(sig, n_keep, tokens.grid))


def _select_batch(cfg: FoPruConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> list[Selection] | None:
    if cfg.mode != "rank":
        return None                                  # row mode: per image
    return [Selection(i) for i in fopru_rank_batch(tokens.scores[(info.feature_layer, "mean")], n_keep)]


SPEC = register_strategy(StrategySpec(
    name="fopru", config_cls=FoPruConfig, stage="vision",
    needs=frozenset({"mean_attention"}), requests=_requests, select=_select, select_batch=_select_batch,
    paper="Jiang et al. 2024, FoPru, arXiv 2411.14164 (re-implementation, no official code)",
))
