"""Baselines: ``random`` (seeded uniform subset) and ``pool`` (2D average pooling of the grid).

``pool`` partitions the (h, w) grid into exactly ``n`` cells: ``oh`` row bands (adaptive-pooling
boundaries), each split into ``n // oh`` or ``n // oh + 1`` column cells, so any budget is met
exactly and a budget ``oh*ow`` gives the regular ``oh x ow`` adaptive average pool. Each cell's
token is the mean of its patches' projector-input features, placed at the cell's central patch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..config import PruneConfig, check_range
from ..registry import register_strategy
from .base import Selection, StrategySpec


@dataclass(frozen=True)
class RandomConfig(PruneConfig):
    """``seed``: the subset depends only on the seed and the grid (the same random mask for every
    image, so batching or pre-encoding never changes it)."""

    name = "random"
    seed: int = 0

    def validate(self) -> None:
        check_range("seed", self.seed, 0, 2**62, integer=True)


@dataclass(frozen=True)
class PoolConfig(PruneConfig):
    name = "pool"


def random_select(n_tokens: int, n_keep: int, seed: int) -> torch.Tensor:
    """A seeded uniform subset of ``n_keep`` of ``n_tokens`` indices, ascending."""
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_tokens, generator=gen)[:n_keep]).values


def _bounds(i: int, n_out: int, n_in: int) -> tuple[int, int]:
    """Adaptive-pooling cell [start, end) of output i (the rule of torch's adaptive_avg_pool)."""
    return (i * n_in) // n_out, math.ceil((i + 1) * n_in / n_out)


def pool_cells(grid: tuple[int, int], n_keep: int) -> list[tuple[int, int, int, int]]:
    """Cells (r0, r1, c0, c1) covering the grid, exactly ``n_keep`` of them, in raster order."""
    h, w = grid
    oh = round(math.sqrt(n_keep * h / w))
    oh = min(max(oh, math.ceil(n_keep / w), 1), h, n_keep)
    cells = []
    for i in range(oh):
        r0, r1 = _bounds(i, oh, h)
        ow = n_keep // oh + (1 if i < n_keep % oh else 0)
        for j in range(ow):
            c0, c1 = _bounds(j, ow, w)
            cells.append((r0, r1, c0, c1))
    return cells


@functools.lru_cache(maxsize=64)
def _pool_plan(grid: tuple[int, int], n_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [n_keep] of each cell's central patch, averaging matrix [n_keep, h*w], cell of each
    token [h*w]) on CPU, cells in index order."""
    h, w = grid
    idx, weights = [], torch.zeros(n_keep, h * w)
    for k, (r0, r1, c0, c1) in enumerate(pool_cells(grid, n_keep)):
        idx.append(((r0 + r1 - 1) // 2) * w + (c0 + c1 - 1) // 2)
        cell = (torch.arange(r0, r1)[:, None] * w + torch.arange(c0, c1)[None]).flatten()
        weights[k, cell] = 1.0 / cell.numel()
    indices = torch.tensor(idx, dtype=torch.long)
    order = torch.argsort(indices)  # bands are raster-ordered already; kept for safety
    weights = weights[order]
    return indices[order], weights, weights.argmax(dim=0)


def pool_select(features: torch.Tensor, grid: tuple[int, int], n_keep: int) -> Selection:
    """features [h*w, D] -> Selection of n_keep pooled tokens at their cells' central patches.

    One float32 matmul with a cached averaging matrix (cell means, as adaptive pooling)."""
    indices, weights, groups = _pool_plan(tuple(grid), n_keep)
    merged = weights.to(features.device) @ features.float()
    return Selection(indices.to(features.device), merged.to(features.dtype), groups.to(features.device))


RANDOM = register_strategy(StrategySpec(
    name="random", config_cls=RandomConfig, stage="vision", needs=frozenset(),
    requests=lambda cfg, info: [],
    select=lambda cfg, tok, n, info: Selection(random_select(tok.grid[0] * tok.grid[1], n, cfg.seed)),
    paper="baseline: uniform random subset",
))
POOL = register_strategy(StrategySpec(
    name="pool", config_cls=PoolConfig, stage="vision", needs=frozenset({"features"}),
    requests=lambda cfg, info: [],
    select=lambda cfg, tok, n, info: pool_select(tok.require_features("pool"), tok.grid, n),
    paper="baseline: 2D average pooling",
))
