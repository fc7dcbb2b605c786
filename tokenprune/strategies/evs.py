"""EVS — Efficient Video Sampling (Bagrov, Khvedchenia, Tymchenko et al., NVIDIA, 2025,
"Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference",
arXiv 2510.14624), with the selection rule vLLM ships (``--video-pruning-rate``).

What the method does. A video's LLM-space tokens are compared frame to frame at the same spatial
position: a token that barely changed since the previous frame is temporally redundant and is
dropped, a token that changed is kept; the first frame has no predecessor and is kept whole. One
fixed pruning rate ``q`` sets how many tokens of the whole video survive, so static videos lose
whole regions of later frames and dynamic ones keep more per frame. Kept tokens keep their
positional identity (their M-RoPE (t, h, w) / sequence position); nothing is merged or trained.

The paper vs vLLM. As summarised from the paper (we could read its abstract and a third-party
summary offline, not the full text), its selection compares raw RGB patches: the L1 difference of a
patch to the same patch of the previous frame, cut at the q-th percentile of all differences, the
first frame kept as the anchor. vLLM — the implementation issue #27 asks us to follow, and what we
implement — ranks the LLM-space tokens by ``1 - cosine`` to the previous frame and keeps a fixed
count. Only vLLM's rule is implemented here.

Reference read (not copied): vLLM ``vllm/multimodal/evs.py`` (later moved to
``vllm/multimodal/video_prune/evs.py``), functions ``compute_retention_mask`` and
``compute_retained_tokens_count``, called from ``_postprocess_video_embeds_evs`` of
``vllm/model_executor/models/qwen2_5_vl.py`` and ``qwen3_vl.py`` on each video's vision-tower output.

Our rule (one call per video, ``unit="video"``), with ``x`` = the video's tokens ``[F, P, D]``
(``F`` = ``VisualTokens.frames`` temporal groups, ``P = h*w`` tokens per group, frame-major, raster
order inside a group):

* ``d[0, p] = +inf`` (the first frame always ranks first); for ``t >= 1``:
  ``d[t, p] = 1 - cos(x[t, p], x[t-1, p])`` (``torch.nn.functional.cosine_similarity`` over D,
  its default eps, computed in the features' own dtype as vLLM does);
* flatten ``d`` frame-major to ``[F*P]``, stable descending sort (ties: lower flat index first,
  i.e. earlier frame, then raster order), keep the first ``n_keep``, return them ascending.

vLLM's first-frame sentinel is the constant 255; any value above 2 (the largest possible
``1 - cos``) gives the same order, so ``+inf`` changes nothing. NaN features rank first in both.

Budget. ``video_pruning_rate = q`` in vLLM is ``keep = 1 - q`` here; ``keep``/``budget`` count the
tokens of one video (images pass through whole, ``images="keep"``; the engine still checks a
``budget`` against each image of the call, so a budget above an image's token count is refused).

Features where we select (``StrategySpec.features="encoder"``): Qwen2-VL / Qwen2.5-VL / Qwen3-VL:
the merger output (the LLM-input video tokens, what vLLM prunes); LLaVA-OneVision: the LLM-input
video tokens after the 2x2 bilinear pooling, per frame ``g x g`` (the newline after the video is a
layout token and always stays). LLaVA-1.5 / LLaVA-NeXT have no video: refused (``needs`` has "video").

Deviations from vLLM, all deliberate:

* **Count.** vLLM keeps ``max(P, int(F*P*(1 - q)))`` tokens: floored, and never fewer than one
  whole frame. Our engine hands every strategy an exact ``n_keep`` (``round(keep*F*P)`` clamped to
  [1, F*P], or ``budget``) and we meet it. ``round`` vs ``int`` can differ by one token; to get
  vLLM's count exactly, pass ``budget=vllm_retained_count(P, F, q)`` (per video).
* **Budgets below one frame.** vLLM never keeps fewer than ``P`` tokens; when ``n_keep < P`` we
  apply the same order, i.e. the first ``n_keep`` tokens of frame 0 in raster order (the sentinel
  ties broken by the lower index). A video of one temporal group (``F = 1``) is that case too.
* **Qwen3-VL features.** vLLM's Qwen3-VL vision tower returns the merger output concatenated with
  the DeepStack levels along channels (``[N, D*(1+L)]``) and EVS's cosine runs over that whole
  vector; ours runs over the main merger output only (what the family hands a strategy). The kept
  set can differ where DeepStack features change and the main features do not.
* **Families vLLM does not prune with EVS** (Qwen2-VL, LLaVA-OneVision as far as we read): the same
  rule on their LLM-input video tokens, our extension.
* **Positions.** Ours: every kept token keeps its original position (M-RoPE (t, h, w) for Qwen,
  the 1-D position for OneVision), and so does the text after the video. vLLM also gives kept
  video tokens their unpruned M-RoPE positions (Qwen2.5-VL: ``compute_mrope_for_media`` indexed by
  the retention mask; Qwen3-VL: the unpruned ``get_mrope_input_positions`` rows, timestamp and
  vision start / end tokens included), but rebuilds the text after a video: on Qwen2.5-VL
  (``recompute_mrope_positions``, 4-channel path) it restarts at vision-start + 1 + the grid width,
  which equals the unpruned numbering only when the width is the largest of the video's (t, h, w)
  extents (long videos: the temporal index is larger, and vLLM's text positions fall inside the
  video's range); on Qwen3-VL it continues after the largest kept position, which is the unpruned
  numbering (the last vision-end token is never pruned).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import PruneConfig
from ..registry import register_strategy
from .base import Selection, StrategySpec, VisionInfo, VisualTokens, topk_indices


@dataclass(frozen=True)
class EVSConfig(PruneConfig):
    """EVS on videos (``evs``): ``keep`` = 1 - vLLM's ``video_pruning_rate`` (fraction of a video's
    tokens kept), or ``budget`` tokens per video. No other parameter: the method has none.
    Images pass through unchanged."""

    name = "evs"


def vllm_retained_count(tokens_per_frame: int, frames: int, rate: float) -> int:
    """vLLM's count for a video of ``frames`` x ``tokens_per_frame`` tokens at pruning rate ``rate``:
    ``max(tokens_per_frame, int(frames * tokens_per_frame * (1 - rate)))`` (use as ``budget=``)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1); got {rate!r}")
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - rate)))


def evs_dissimilarity(features: torch.Tensor) -> torch.Tensor:
    """features [..., F, P, D] -> [..., F*P] frame-major: +inf for the first frame, else
    ``1 - cos`` to the same position of the previous frame (in the features' dtype)."""
    first = torch.full_like(features[..., :1, :, 0], float("inf"))
    if features.shape[-3] == 1:
        return first.flatten(-2)
    sim = F.cosine_similarity(features[..., 1:, :, :], features[..., :-1, :, :], dim=-1)
    return torch.cat([first, 1 - sim], dim=-2).flatten(-2)


def evs_select(features: torch.Tensor, n_keep: int) -> torch.Tensor:
    """features [..., F, P, D] -> [..., n_keep] ascending frame-major indices of the ``n_keep``
    most dissimilar tokens (first frame first; ties: lower index). No host sync."""
    return torch.sort(topk_indices(evs_dissimilarity(features), n_keep), dim=-1).values


def _frames(tokens: VisualTokens) -> torch.Tensor:
    """The unit's features as [..., F, P, D]."""
    h, w = tokens.grid
    x = tokens.require_features("evs")
    return x.reshape(*x.shape[:-2], tokens.frames, h * w, x.shape[-1])


def _select(cfg: EVSConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    return Selection(evs_select(_frames(tokens), n_keep))


def _select_batch(cfg: EVSConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> list[Selection]:
    idx = evs_select(_frames(tokens), n_keep)          # [B, n_keep]
    return [Selection(row) for row in idx.unbind(0)]


SPEC = register_strategy(StrategySpec(
    name="evs", config_cls=EVSConfig, stage="vision", needs=frozenset({"features", "video"}),
    requests=lambda cfg, info: [], select=_select, select_batch=_select_batch,
    unit="video", images="keep",
    paper="Bagrov et al. 2025, Efficient Video Sampling (EVS), arXiv 2510.14624; vLLM's video_pruning_rate",
))
