"""VisPruner (Zhang, Cheng, Lu, Zhang, Zhuo, Cao, Guo, She, Zhang; ICCV 2025, "Beyond Text-Visual
Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs", arXiv 2412.01818; official
code github.com/Theia-4869/VisPruner, ``llava/model/llava_arch.py`` ``encode_images`` and
``llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select``).

What the paper does, before the LLM, per image (per anyres crop in LLaVA-NeXT): keep ``T_imp``
*important* tokens, those the [CLS] query attends to most in the vision encoder, then ``T_div``
*diverse* tokens out of the rest, found by removing the remaining tokens that are most similar to
the others, a few at a time, until ``T_div`` are left. Nothing is merged.

Our rule, one image of N tokens, budget ``n_keep``:

* split: ``T_imp = int(n_keep * important_ratio)`` (floor, as the official code), ``T_div =
  n_keep - T_imp``; ``important=`` fixes ``T_imp`` instead.
* important: the ``T_imp`` largest entries of ``scores[(feature_layer, "cls")]`` [N] (CLS query row
  of the feature layer, heads averaged, CLS column dropped). This is the layer the official code
  reads: ``attentions[mm_vision_select_layer]`` with ``mm_vision_select_layer = -2``, i.e. the
  attention inside the block whose output is ``hidden_states[-2]`` (0-based layer 22 of CLIP-L's
  24), the same block whose output feeds the projector (``VisionInfo.feature_layer``).
  Towers without CLS (SigLIP in OneVision, Qwen-VL's ViT) use ``"mean"`` [N] (attention received,
  averaged over heads and queries) instead, as our VisionZip (``important_score="auto"``).
* diverse: the other tokens in descending importance order form the residual list ``R`` (the
  official order; it matters below). ``x = features / |features|`` [N, D]; cosine similarities are
  computed once, ``S = x[R] @ x[R].T``. While ``|R| > T_div``: ``r = min(removal_step, |R| - T_div,
  ceil(|R|/2))``; split ``R`` by position into ``A = R[0::2]`` and ``B = R[1::2]``; each ``a`` in A
  scores ``max_b S[a, b]`` (its best match in B); the ``r`` highest-scoring members of A are
  removed; the new list is ``[rest of A in descending score order] + B`` (the official
  concatenation, so the next split differs).
* result: the important and the diverse tokens, ``n_keep`` in all, ascending indices.

Features (the official code uses the CLIP output of the select layer, patch tokens, *before* the
projector): on LLaVA-1.5 ``VisualTokens.features`` is that same tensor (the projector input,
``StrategySpec.features="encoder"``). On LLaVA-NeXT / OneVision (per crop unit) and Qwen-VL
(merger output) our features are the LLM-input tokens (after the projector / merger): the
similarity there is in LLM space, not the encoder's.

Defaults: ``important_ratio=0.5`` (the official ``--important_ratio`` default and the README's
128-token example: 64 + 64; its 64-token MME example uses 0.75, i.e. 48 + 16), ``removal_step=8``
(hard-coded in the official loop), ``important_score="auto"``.

Deviations from the official code:

* exact budget on any N: the official loop indexes with ``R // 2`` where A has ``ceil(R / 2)``
  members, so an odd residual count raises IndexError (e.g. N - T_imp = 545; it only runs
  where the shapes happen to broadcast), and ``ceil(R/2) < r`` (tiny grids) asks for a negative
  size; we cap ``r`` at ``|A|`` and keep all of A's survivors, so exactly ``T_div`` remain for
  any N (LLaVA-1.5's even residual counts give the official tokens, up to ties / precision).
* ties: the official ``argsort`` is not stable; we sort stably (importance: lower index first;
  removal: earlier position in A first), so the selection is deterministic.
* precision: similarities in float32 (the official code runs in the model's fp16), computed once
  per image for the residual set and gathered each round (the same dot products as the official
  per-round matmul; one matmul per image, so a batch selects what one by one does);
  ``F.normalize`` (eps 1e-12) instead of a bare division, so an all-zero feature has similarity
  0 instead of NaN.
* LLaVA-NeXT: the official code prunes every 576-token crop (base and each high-resolution
  crop) to the same ``T`` on its own, before unpadding (which then drops some kept tokens, so its
  count is not exact). Here the engine's units are the base crop and the unpadded high-resolution
  canvas (the tokens the LLM sees, newlines excluded), the image budget split by crops covered
  (base 1, canvas its number of crops); the split and the diverse step run once over the whole
  canvas, in LLM space, so redundancy across crops is removed too.
* CLS: as every strategy here, the CLS token is not an LLM token in HF LLaVA (the official
  ``select_feature="patch"`` drops it too), so nothing changes there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError, PruneConfig, check_range
from ..registry import register_strategy
from .base import ScoreRequest, Selection, StrategySpec, VisionInfo, VisualTokens, attention_kind

SCORES = ("auto", "cls", "mean")


@dataclass(frozen=True)
class VisPrunerConfig(PruneConfig):
    """``important_ratio``: share of the per-image budget given to important tokens (floor, as
    the official code); ``important``: that count directly (overrides the ratio);
    ``important_score``: ``"cls"`` (the paper: CLS-query attention), ``"mean"`` (attention
    received: the substitute for towers without CLS) or ``"auto"`` (cls when the tower has one);
    ``removal_step``: residual tokens removed per round of the diverse step (official: 8)."""

    name = "vispruner"
    important_ratio: float = 0.5
    important: int | None = None
    important_score: str = "auto"
    removal_step: int = 8

    def validate(self) -> None:
        check_range("important_ratio", self.important_ratio, 0.0, 1.0)
        if self.important is not None:
            check_range("important", self.important, 0, 10**9, integer=True)
            if self.budget is not None and self.important > self.budget:
                raise ConfigError(f"important={self.important} is more than the budget of {self.budget} tokens")
        if self.important_score not in SCORES:
            raise ConfigError(f"important_score must be 'auto', 'cls' or 'mean'; got {self.important_score!r}")
        check_range("removal_step", self.removal_step, 1, 10**9, integer=True)

    def split(self, n_keep: int) -> tuple[int, int]:
        """(important, diverse) for a per-image budget of ``n_keep``."""
        n_imp = self.important if self.important is not None else int(n_keep * self.important_ratio)
        if not 0 <= n_imp <= n_keep:
            raise ConfigError(f"important={n_imp} does not fit the budget of {n_keep} tokens per image")
        return n_imp, n_keep - n_imp


def importance_order(score: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, N] token indices by descending score (ties: lower index first)."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices


def diverse_positions(sim: torch.Tensor, n_diverse: int, step: int) -> torch.Tensor:
    """The official iterative removal on a precomputed similarity matrix.

    sim: [B, R, R] cosine similarities of the residual tokens, in residual order (descending
    importance); returns [B, n_diverse] positions into that order (in the loop's final order,
    not sorted). Each round: A = even positions of the current list, B = odd; every member of A
    scores its best similarity to B; the ``r`` highest-scoring members of A go (stable: earlier
    first on ties); the list becomes [A's survivors by descending score] + B.
    """
    b, r0 = sim.shape[0], sim.shape[1]
    rows = torch.arange(b, device=sim.device)[:, None, None]
    cur = torch.arange(r0, device=sim.device).expand(b, r0)
    if n_diverse <= 0:
        return cur[:, :0]
    while True:
        n = cur.shape[1]
        r = min(step, n - n_diverse, (n + 1) // 2)
        if r <= 0:
            return cur
        a, bb = cur[:, 0::2], cur[:, 1::2]                                  # [B, ceil(n/2)], [B, n//2]
        best = sim[rows, a[:, :, None], bb[:, None, :]].amax(dim=-1)       # [B, |A|]
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, r:]
        cur = torch.cat([torch.gather(a, 1, order), bb], dim=1)


def vispruner_select_batch(score: torch.Tensor, features: torch.Tensor, n_important: int,
                           n_diverse: int, step: int = 8) -> torch.Tensor:
    """score [B, N], features [B, N, D] -> [B, n_important + n_diverse] ascending kept indices.

    No host sync: every shape is known from N and the budget, so the loop runs the same number
    of rounds for every image."""
    bsz, n = score.shape
    order = importance_order(score)
    important = order[:, :n_important]
    if n_diverse > 0:
        residual = order[:, n_important:]                                   # [B, R], descending score
        d = features.shape[-1]
        x = F.normalize(torch.gather(features, 1, residual[:, :, None].expand(bsz, residual.shape[1], d)).float(),
                        dim=-1)
        # one matmul per image (not one bmm): an image's similarities, and so its selection, do
        # not depend on what else is in the batch (a batched GEMM may pick another kernel per size)
        sim = torch.stack([xi @ xi.T for xi in x.unbind(0)])
        pos = diverse_positions(sim, n_diverse, step)
        kept = torch.cat([important, torch.gather(residual, 1, pos)], dim=1)
    else:
        kept = important
    return torch.sort(kept, dim=1).values


def vispruner_select(score: torch.Tensor, features: torch.Tensor, n_important: int, n_diverse: int,
                     step: int = 8) -> torch.Tensor:
    """One image: score [N], features [N, D] -> [n_important + n_diverse] ascending indices
    (the batched function on a batch of one, so both give the same tokens)."""
    return vispruner_select_batch(score[None], features[None], n_important, n_diverse, step)[0]


def important_kind(cfg: VisPrunerConfig, info: VisionInfo) -> str:
    """Score kind that ranks important tokens for this encoder ("cls" or "mean")."""
    return attention_kind(cfg.important_score, info, "important_score")


def _requests(cfg: VisPrunerConfig, info: VisionInfo) -> list[ScoreRequest]:
    return [ScoreRequest(info.feature_layer, important_kind(cfg, info))]  # type: ignore[arg-type]


def _select(cfg: VisPrunerConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    n_imp, n_div = cfg.split(n_keep)
    assert tokens.features is not None
    score = tokens.scores[(info.feature_layer, important_kind(cfg, info))]
    return Selection(vispruner_select(score, tokens.features, n_imp, n_div, cfg.removal_step))


def _select_batch(cfg: VisPrunerConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> list[Selection]:
    n_imp, n_div = cfg.split(n_keep)
    assert tokens.features is not None
    score = tokens.scores[(info.feature_layer, important_kind(cfg, info))]
    idx = vispruner_select_batch(score, tokens.features, n_imp, n_div, cfg.removal_step)
    return [Selection(idx[i]) for i in range(idx.shape[0])]


SPEC = register_strategy(StrategySpec(
    name="vispruner", config_cls=VisPrunerConfig, stage="vision",
    needs=frozenset({"mean_attention", "features"}), requests=_requests, select=_select,
    select_batch=_select_batch,
    paper="Zhang et al. 2025, VisPruner, ICCV 2025, arXiv 2412.01818",
))
