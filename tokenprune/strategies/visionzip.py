"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant + contextual tokens.

Dominant tokens: highest CLS-query attention at the feature layer (heads averaged; the official
code sums heads, which ranks identically). Contextual tokens, as the official code: the remaining
tokens are split into ``contextual`` targets picked with a uniform stride (``M // contextual``)
and members; each member joins the target with the highest cosine similarity of head-mean keys
(same layer); a contextual token = target feature + mean of its members' features (the target
alone if it has none). Merging happens on the projector input, as the official code.

Deviations, forced by stock HF LLaVA (the processor reserves no placeholder for CLS):
the CLS token is not passed to the LLM, so all ``dominant`` slots go to patches; each
contextual token is placed at its target's index (kept tokens stay in raster order) instead of
being appended after the dominant ones.
Default split follows the paper (54+10, 108+20, 162+30): dominant = round(n*54/64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError, PruneConfig, check_range
from ..registry import register_strategy
from .base import ScoreRequest, Selection, StrategySpec, VisionInfo, VisualTokens, attention_kind, mask_to_indices, rank_desc, topk_indices

DOMINANT_SHARE = 54 / 64


@dataclass(frozen=True)
class VisionZipConfig(PruneConfig):
    """``dominant`` / ``contextual``: per-image split of the budget (None: the paper's 54:10).
    ``dominant_score``: what ranks dominant tokens, ``"cls"`` (the paper: CLS-query attention),
    ``"mean"`` (attention received, averaged over all queries: the substitute for towers without a
    CLS token such as SigLIP and Qwen's ViT) or ``"auto"`` (cls when the tower has one)."""

    name = "visionzip"
    dominant: int | None = None
    contextual: int | None = None
    dominant_score: str = "auto"

    def validate(self) -> None:
        if self.dominant_score not in ("auto", "cls", "mean"):
            raise ConfigError(f"dominant_score must be 'auto', 'cls' or 'mean'; got {self.dominant_score!r}")
        for k in ("dominant", "contextual"):
            v = getattr(self, k)
            if v is not None:
                check_range(k, v, 0, 10**9, integer=True)
        if self.dominant is not None and self.contextual is not None and self.budget is not None:
            if self.dominant + self.contextual != self.budget:
                raise ConfigError(
                    f"dominant + contextual must equal budget; got {self.dominant} + "
                    f"{self.contextual} != {self.budget}"
                )

    def split(self, n_keep: int) -> tuple[int, int]:
        """(dominant, contextual) for a per-image budget of ``n_keep``."""
        if self.dominant is None and self.contextual is None:
            dominant = round(n_keep * DOMINANT_SHARE)
        elif self.dominant is not None:
            dominant = self.dominant
        else:
            dominant = n_keep - self.contextual  # type: ignore[operator]
        if not 0 <= dominant <= n_keep:
            raise ConfigError(f"dominant={dominant} does not fit the budget of {n_keep} tokens per image")
        return dominant, n_keep - dominant


def visionzip_select(cls_score: torch.Tensor, keys: torch.Tensor, features: torch.Tensor,
                     n_dominant: int, n_contextual: int) -> Selection:
    """cls_score [N], keys [N, d], features [N, D] -> Selection of n_dominant + n_contextual tokens.

    If fewer than ``n_contextual`` tokens remain after the dominant ones, every remaining token
    becomes a target (the budget is still met exactly).
    """
    n = cls_score.numel()
    dominant = topk_indices(cls_score, n_dominant)
    rest_mask = torch.ones(n, dtype=torch.bool, device=cls_score.device)
    rest_mask[dominant] = False
    rest = torch.nonzero(rest_mask).flatten()
    m = rest.numel()
    n_contextual = min(n_contextual, m)
    if n_contextual == 0:
        idx = torch.sort(dominant).values
        return Selection(idx, None)
    step = max(1, m // n_contextual)
    target_pos = torch.arange(0, m, step, device=rest.device)[:n_contextual]
    is_target = torch.zeros(m, dtype=torch.bool, device=rest.device)
    is_target[target_pos] = True
    targets, members = rest[is_target], rest[~is_target]
    contextual = features[targets].clone()
    if members.numel():
        kn = F.normalize(keys[members].float(), dim=-1)
        kt = F.normalize(keys[targets].float(), dim=-1)
        assign = torch.argmax(kn @ kt.T, dim=1)
        sums = torch.zeros(n_contextual, features.shape[-1], dtype=torch.float32, device=features.device)
        sums.index_add_(0, assign, features[members].float())
        counts = torch.bincount(assign, minlength=n_contextual).to(sums.dtype)[:, None]
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        contextual = (contextual.float() + means).to(features.dtype)
    indices = torch.cat([dominant, targets])
    merged = torch.cat([features[dominant], contextual])
    order = torch.argsort(indices)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)   # position of each in the sorted output
    groups = torch.full((n,), -1, dtype=torch.long, device=cls_score.device)
    groups[indices] = rank
    if members.numel():
        groups[members] = rank[n_dominant + assign]
    return Selection(indices[order], merged[order], groups)


def visionzip_select_batch(cls_score: torch.Tensor, keys: torch.Tensor, features: torch.Tensor,
                           n_dominant: int, n_contextual: int) -> list[Selection]:
    """:func:`visionzip_select` for a batch: cls_score [B, N], keys [B, N, d], features [B, N, D]
    -> one Selection per image, the same as row by row (tested). Every image has the same number
    of remaining tokens, so targets and members are fixed-size gathers and the merge is one
    batched matmul + scatter-add (no per-image loop, no host sync)."""
    b, n = cls_score.shape
    dev = cls_score.device
    dominant_mask = rank_desc(cls_score) < n_dominant
    m = n - n_dominant
    n_ctx = min(n_contextual, m)
    dominant = mask_to_indices(dominant_mask, n_dominant)                    # [B, nd] ascending
    if n_ctx == 0:
        return [Selection(dominant[i]) for i in range(b)]
    rest = mask_to_indices(~dominant_mask, m)                                # [B, m] ascending
    step = max(1, m // n_ctx)
    # the target / member columns are known on the host: index with them (a boolean mask would
    # be a host sync)
    target_cols = list(range(0, m, step))[:n_ctx]
    member_cols = sorted(set(range(m)) - set(target_cols))
    targets = rest[:, torch.tensor(target_cols, dtype=torch.long, device=dev)]          # [B, nc]
    members = rest[:, torch.tensor(member_cols, dtype=torch.long, device=dev)]          # [B, nm]
    rows = torch.arange(b, device=dev)[:, None]
    gather = lambda x, idx: x[rows, idx]  # noqa: E731  (row-wise take: [B, k, ...])
    contextual = gather(features, targets).float()
    assign = None
    if members.shape[1]:
        kn = F.normalize(gather(keys, members).float(), dim=-1)
        kt = F.normalize(gather(keys, targets).float(), dim=-1)
        assign = torch.argmax(kn @ kt.transpose(1, 2), dim=-1)               # [B, nm]
        flat = (assign + rows * n_ctx).flatten()                             # target id over the batch
        d = features.shape[-1]
        sums = torch.zeros(b * n_ctx, d, device=dev).index_add_(0, flat, gather(features, members).reshape(-1, d).float())
        counts = torch.bincount(flat, minlength=b * n_ctx).float()[:, None]
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        contextual = contextual + means.reshape(b, n_ctx, d)
    indices = torch.cat([dominant, targets], 1)
    merged = torch.cat([gather(features, dominant), contextual.to(features.dtype)], 1)
    order = torch.argsort(indices, dim=1)
    rank = torch.argsort(order, dim=1)                                       # position in the sorted output
    groups = torch.full((b, n), -1, dtype=torch.long, device=dev)
    groups.scatter_(1, indices, rank)
    if assign is not None:
        groups.scatter_(1, members, torch.gather(rank[:, n_dominant:], 1, assign))
    idx_sorted = torch.gather(indices, 1, order)
    feat_sorted = gather(merged, order)
    return [Selection(idx_sorted[i], feat_sorted[i], groups[i]) for i in range(b)]


def dominant_kind(cfg: VisionZipConfig, info: VisionInfo) -> str:
    """Score kind that ranks dominant tokens for this encoder ("cls" or "mean")."""
    return attention_kind(cfg.dominant_score, info, "dominant_score")


def _requests(cfg: VisionZipConfig, info: VisionInfo) -> list[ScoreRequest]:
    return [ScoreRequest(info.feature_layer, dominant_kind(cfg, info)),  # type: ignore[arg-type]
            ScoreRequest(info.feature_layer, "keys")]


def _select(cfg: VisionZipConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    d, c = cfg.split(n_keep)
    assert tokens.features is not None
    return visionzip_select(tokens.scores[(info.feature_layer, dominant_kind(cfg, info))],
                            tokens.scores[(info.feature_layer, "keys")], tokens.features, d, c)


def _select_batch(cfg: VisionZipConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> list[Selection]:
    d, c = cfg.split(n_keep)
    assert tokens.features is not None
    return visionzip_select_batch(tokens.scores[(info.feature_layer, dominant_kind(cfg, info))],
                                  tokens.scores[(info.feature_layer, "keys")], tokens.features, d, c)


SPEC = register_strategy(StrategySpec(
    name="visionzip", config_cls=VisionZipConfig, stage="vision",
    needs=frozenset({"mean_attention", "keys", "features"}), requests=_requests, select=_select,
    select_batch=_select_batch,
    paper="Yang et al. 2025, VisionZip, CVPR 2025, arXiv 2412.04467",
))
