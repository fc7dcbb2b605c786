"""PruMerge / PruMerge+ (Shang, Cai, Xu, Lee & Yan, "LLaVA-PruMerge: Adaptive Token Reduction for
Efficient Large Multimodal Models", ICCV 2025, arXiv 2403.15388), with a fixed budget.

What the official code does (github.com/42Shawn/LLaVA-PruMerge,
``llava/model/multimodal_encoder/clip_encoder.py``, ``token_prune_merge_advanced_plus``, the
variant its ``forward`` calls, ``if_adaptive=True``), on CLIP ViT-L/336 (24 layers, 576 patches):

1. Score: q and k of the LAST encoder layer (``layers[23]``, whose input is ``hidden_states[-2]``,
   the features LLaVA projects); attention = softmax(q k^T / sqrt(1024)) over the concatenated
   heads (one 1024-d "head"); the CLS row without its CLS column is the importance ``a`` [576].
2. Adaptive selection: IQR outlier detection on ``a`` (``np.percentile`` 25/75, linear);
   tokens with ``a > Q3 + 1.5 * IQR`` are kept (a top-k of ``a`` with k = their count).
3. PruMerge+ only: spatial samples with a flat stride ``int(int(576/k)/3)`` over indices 0..574,
   those already kept removed, are appended (on average about 144 tokens instead of about 32).
4. Merge: every kept token i takes the 32 tokens with the highest cosine similarity of keys
   (full 1024-d keys of the same layer) among ALL other tokens (the other kept ones included)
   and becomes ``x_i + sum_j a_j x_j`` (raw attention weights, not normalised), on the projector
   input (CLIP features).
5. One extra token, ``sum_j a_j x_j`` over all tokens not kept, is appended after them.

Our rule (per image or crop unit; ``a`` [N] the score, ``K`` [N, d] the keys, ``X`` [N, D] the
features, ``n`` the budget, all from one encoder layer L):

* ``n == N``: nothing is pruned, so nothing is merged (identity; keep=1 stays bit-identical).
* Important tokens: the IQR outliers ``{i : a_i > Q3 + iqr_scale * (Q3 - Q1)}`` (``torch.quantile``,
  linear, as ``np.percentile``); if there are more than ``n``, the ``n`` highest ``a`` (ties:
  lower index). The outliers are exactly the top of ``a``, so this is ``rank(a) < min(#outliers, n)``.
* ``plus=True`` (PruMerge+): the other ``m = n - n_imp`` slots are spatially uniform samples: of
  the ``M = N - n_imp`` tokens left, in raster order, those at positions ``floor(j * M / m)``,
  j = 0..m-1 (a flat stride, as the official code, spread to fill the budget exactly; never a
  token already kept, so no top-up is ever needed).
  ``plus=False`` (PruMerge): the other slots go to the next-highest ``a`` (so the kept set is the
  top ``n`` of ``a``, whatever the outlier count).
* Merge (``merge=True``): for every kept token i, the ``min(knn, N-1)`` tokens j != i with the
  highest cosine similarity of ``K`` (ties: lower index), kept or pruned; kept feature
  ``X_i + sum_j a_j X_j`` (float32, original features of the neighbours, cast back).
  ``groups`` [N]: kept tokens -> themselves; a pruned token -> the kept token that took it with
  the highest similarity (ties: lower position); a pruned token no kept token took -> -1 (dropped).
* Kept indices ascending (raster order), exactly ``n`` of them; fully batched (no host sync).

Defaults and where they come from: ``knn=32``, ``iqr_scale=1.5``, ``plus=True`` (the variant the
official ``forward`` runs), ``merge=True`` (the official always merges); ``layer=None`` = the
encoder layer right after the feature layer (LLaVA-1.5: feature layer 23 of 24 (1-based), layer 24,
the official ``layers[23]``), the feature layer itself where it is the last one (OneVision, Qwen);
``score="auto"``: CLS attention where the tower has a CLS token, else ``"mean"``.

Towers without CLS (SigLIP in LLaVA-OneVision, Qwen's ViT): ``score="auto"`` falls back to the
attention each token receives, averaged over heads and query rows (``"mean"``), as VisionZip's
``dominant_score="auto"`` does here, and as the third-party EffiVLM-Bench port of PruMerge+ to
Qwen2-VL does (github.com/LoverLost/EffiVLM-Bench, ``kv_cache_compression/qwen2vl_model.py``: a
fixed budget too, attention received averaged over heads and queries of the penultimate block).
Both uses of ``a`` (IQR ranking, merge weights) only need a per-token importance that sums to about
1, which the mean row gives; this is not the paper's method, only its nearest analogue, so results
on those families are "PruMerge-style". ``score="cls"``
forces the paper's rule and is refused with :class:`IncompatibleStrategyError` where there is no CLS.

Deviations from the official code, and why:

* Budget: fixed and exact (the issue asks for comparable budgets), so the IQR count only splits the
  budget between important tokens and spatial samples, and is truncated when it exceeds the budget.
* Spatial samples: a stride over the tokens not yet kept, spread to fill ``m`` slots exactly,
  instead of the fixed stride ``int(int(N/k)/3)`` over 0..574 (hard-coded for 576 tokens) with
  collisions removed.
* Attention: the engine's "cls" score, the head-mean of per-head softmax rows (softmax over CLS and
  patches, CLS column dropped), not one softmax over the concatenated 1024-d q/k scaled by 1/32;
  the engine offers no concatenated-head score. Ranking and merge weights can differ somewhat.
* Keys: head-mean keys [N, d_head], not the concatenated [N, 1024] keys (same reason).
* The extra appended token (attention-weighted sum of all pruned tokens) is dropped: stock HF
  LLaVA has no placeholder for it and the budget must be exact; pruned tokens that no kept token
  took are therefore lost, as marked in ``groups``.
* Order: kept tokens stay at their own positions in raster order (the official order is outliers by
  attention, then samples, then the extra token). Ties are broken by the lower index
  (``torch.topk`` leaves them unspecified).
* IQR per image / crop unit (the official flattens its batch, which is one image in its evaluation).
* ``n == N`` is the identity (the official would still add neighbours into every token).
* Features: LLaVA-1.5 merges on the projector input as the official code; LLaVA-NeXT / OneVision /
  Qwen merge the family's selection-point tokens (LLM-input tokens per crop unit / merger output).
* ``groups`` is a one-target summary: in the official merge a pruned token may feed several kept
  tokens (it is counted in all of them in the features, as the official code does).
* Training-free only: the official release ships LoRA-fine-tuned checkpoints (its README), which the
  paper reports next to training-free use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError, PruneConfig, check_range
from ..errors import IncompatibleStrategyError
from ..registry import register_strategy
from .base import ScoreRequest, Selection, StrategySpec, VisionInfo, VisualTokens, attention_kind, mask_to_indices, rank_desc

SCORES = ("auto", "cls", "mean")


@dataclass(frozen=True)
class PruMergeConfig(PruneConfig):
    """``plus``: PruMerge+ (spatial samples fill the budget after the IQR outliers) or PruMerge
    (the next-highest attention does); ``merge``: merge pruned tokens into the kept ones;
    ``knn``: neighbours merged into each kept token; ``iqr_scale``: the fence ``Q3 + iqr_scale*IQR``;
    ``layer``: 1-based encoder layer of the attention and keys (None: the one after the feature
    layer, or the feature layer where it is the last); ``score``: ``"cls"`` (the paper), ``"mean"``
    (attention received, for towers without CLS) or ``"auto"`` (cls when the tower has one)."""

    name = "prumerge"
    plus: bool = True
    merge: bool = True
    knn: int = 32
    iqr_scale: float = 1.5
    layer: int | None = None
    score: str = "auto"

    def validate(self) -> None:
        for k in ("plus", "merge"):
            if not isinstance(getattr(self, k), bool):
                raise ConfigError(f"{k} must be True or False; got {getattr(self, k)!r}")
        check_range("knn", self.knn, 1, 10**9, integer=True)
        check_range("iqr_scale", self.iqr_scale, 0.0, 1e6)
        if self.layer is not None:
            check_range("layer", self.layer, 1, 10_000, integer=True)
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {SCORES}; got {self.score!r}")


def score_layer(cfg: PruMergeConfig, info: VisionInfo) -> int:
    """0-based encoder layer whose attention and keys are read."""
    if cfg.layer is None:
        return min(info.feature_layer + 1, info.num_layers - 1)
    if cfg.layer > info.num_layers:
        raise ConfigError(f"layer={cfg.layer} is out of range for a vision encoder of {info.num_layers} "
                          f"layers; use 1..{info.num_layers}")
    return cfg.layer - 1


def score_kind(cfg: PruMergeConfig, info: VisionInfo) -> str:
    """"cls" or "mean" for this encoder."""
    return attention_kind(cfg.score, info, "prumerge's score", IncompatibleStrategyError)


def iqr_outlier_count(score: torch.Tensor, iqr_scale: float = 1.5) -> torch.Tensor:
    """[B, N] -> [B] number of tokens above ``Q3 + iqr_scale * (Q3 - Q1)`` (linear quantiles)."""
    s = score.float()
    q = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device), dim=-1)   # [2, B]
    fence = q[1] + iqr_scale * (q[1] - q[0])
    return (s > fence[:, None]).sum(-1)


def prumerge_keep_mask(score: torch.Tensor, n_keep: int, *, plus: bool = True,
                       iqr_scale: float = 1.5) -> torch.Tensor:
    """[B, N] scores -> [B, N] bool, exactly ``n_keep`` True per row (see the module docstring)."""
    rank = rank_desc(score)
    if not plus:
        return rank < n_keep
    n = score.shape[-1]
    n_imp = iqr_outlier_count(score, iqr_scale).clamp(max=n_keep)[:, None]    # [B, 1]
    imp = rank < n_imp
    rest = ~imp
    pos = torch.cumsum(rest.long(), dim=-1) - 1          # position among the tokens left
    left = (n - n_imp).clamp(min=1)                      # M
    slots = n_keep - n_imp                               # m
    # position p is floor(j*M/m) for some j  <=>  ceil(p*m/M) * M < (p+1) * m
    first_j = (pos * slots + left - 1).div(left, rounding_mode="floor")
    sample = rest & (first_j * left < (pos + 1) * slots)
    return imp | sample


def prumerge_merge(score: torch.Tensor, keys: torch.Tensor, features: torch.Tensor,
                   kept: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """score [B, N], keys [B, N, d], features [B, N, D], kept [B, n] ascending ->
    (merged [B, n, D] in the features' dtype, groups [B, N]).

    Kept token i absorbs its ``min(knn, N-1)`` most key-similar other tokens j (cosine, ties:
    lower index), weighted by ``score_j``: ``X_i + sum_j score_j X_j``."""
    b, n_tok = score.shape
    n = kept.shape[1]
    rows = torch.arange(b, device=kept.device)[:, None]
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn[rows, kept] @ kn.transpose(1, 2)                                  # [B, n, N]
    sim.scatter_(2, kept[..., None], float("-inf"))                            # never itself
    k = min(knn, n_tok - 1)
    # the k most similar, ties at the k-th value -> lower index: everything above the k-th value,
    # then the first equal ones (only the k-th value is read from topk, so its tie order is moot)
    kth = torch.topk(sim, k, dim=-1).values[..., -1:]
    above = sim > kth
    tied = sim == kth
    chosen = above | (tied & (torch.cumsum(tied.int(), -1) <= k - above.sum(-1, keepdim=True)))
    weights = torch.where(chosen, score.float()[:, None, :], torch.zeros((), device=score.device))
    x = features.float()
    merged = (x[rows, kept] + weights @ x).to(features.dtype)
    del weights
    best = torch.argmax(sim.masked_fill_(~chosen, float("-inf")), dim=1)       # [B, N]
    groups = torch.where(chosen.any(1), best, torch.full_like(best, -1))
    groups.scatter_(1, kept, torch.arange(n, device=kept.device).expand(b, n).contiguous())
    return merged, groups


def prumerge_select_batch(score: torch.Tensor, keys: torch.Tensor | None, features: torch.Tensor | None,
                          n_keep: int, *, plus: bool = True, merge: bool = True, knn: int = 32,
                          iqr_scale: float = 1.5) -> list[Selection]:
    """score [B, N], keys [B, N, d], features [B, N, D] -> one Selection of ``n_keep`` per image."""
    b, n = score.shape
    if n_keep >= n:
        return [Selection(torch.arange(n, device=score.device)) for _ in range(b)]
    kept = mask_to_indices(prumerge_keep_mask(score, n_keep, plus=plus, iqr_scale=iqr_scale), n_keep)
    if not merge:
        return [Selection(kept[i]) for i in range(b)]
    if keys is None or features is None:
        raise ValueError("prumerge's merge needs the keys and the features")
    merged, groups = prumerge_merge(score, keys, features, kept, knn)
    return [Selection(kept[i], merged[i], groups[i]) for i in range(b)]


def prumerge_select(score: torch.Tensor, keys: torch.Tensor | None, features: torch.Tensor | None,
                    n_keep: int, **kw: object) -> Selection:
    """One image: score [N], keys [N, d], features [N, D] (the batch of one)."""
    one = lambda t: None if t is None else t[None]  # noqa: E731
    return prumerge_select_batch(score[None], one(keys), one(features), n_keep, **kw)[0]  # type: ignore[arg-type]


def _requests(cfg: PruMergeConfig, info: VisionInfo) -> list[ScoreRequest]:
    layer = score_layer(cfg, info)
    out = [ScoreRequest(layer, score_kind(cfg, info))]  # type: ignore[arg-type]
    if cfg.merge:
        out.append(ScoreRequest(layer, "keys"))
    return out


def _select_batch(cfg: PruMergeConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> list[Selection]:
    layer = score_layer(cfg, info)
    return prumerge_select_batch(tokens.scores[(layer, score_kind(cfg, info))],
                                 tokens.scores.get((layer, "keys")), tokens.features, n_keep,
                                 plus=cfg.plus, merge=cfg.merge, knn=cfg.knn, iqr_scale=cfg.iqr_scale)


def _select(cfg: PruMergeConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    one = VisualTokens(grid=tokens.grid, features=None if tokens.features is None else tokens.features[None],
                       scores={k: v[None] for k, v in tokens.scores.items()}, frames=tokens.frames)
    return _select_batch(cfg, one, n_keep, info)[0]


SPEC = register_strategy(StrategySpec(
    name="prumerge", config_cls=PruMergeConfig, stage="vision",
    needs=frozenset({"mean_attention", "keys", "features"}), requests=_requests, select=_select,
    select_batch=_select_batch,
    paper="Shang et al. 2025, LLaVA-PruMerge (PruMerge+), ICCV 2025, arXiv 2403.15388",
))
