"""DivPrune (Alvar, Singh, Akbari, Zhang; CVPR 2025, arXiv 2503.02175): max–min diversity pruning.

What the paper does: token pruning is cast as a Max–Min Diversity Problem (MMDP) over the visual
tokens the LLM receives (after the projector): choose the subset of the budgeted size whose
smallest pairwise cosine distance ``d(a, b) = 1 - cos(a, b)`` is largest, and drop the rest. MMDP
is NP-hard; the paper solves it greedily (its Algorithm 1): the first token is the one whose
minimum distance to all *other* tokens is largest (the most isolated token), then, until the
budget is met, the token whose minimum distance to the tokens chosen so far is largest is added.
No attention scores, no calibration, no training.
(The paper's method section could not be read offline when this was written: the first-pick rule
is the algorithm as its authors' abstract and secondary summaries describe it; check it against
Algorithm 1 of the PDF.)

Our rule (``divprune_select_batch``; ``divprune_select`` is the one-image case):

* ``features`` [B, N, D] -> unit rows ``x = normalize(features.float())`` [B, N, D];
  ``sim = x @ x^T`` [B, N, N] (cosine similarity; a zero row is similar 0 to everything).
* first pick per image: ``argmin_i max_{j != i} sim[i, j]`` (= argmax of the nearest-other distance).
* ``closest`` [B, N]: every token's largest similarity to the chosen set (= 1 - its smallest
  distance); each step picks ``argmin`` of ``closest`` over the tokens not yet chosen, then updates
  ``closest = max(closest, sim[pick])``: O(N) per step, a Python loop over the k picks only,
  no host sync (no ``.item()`` / ``nonzero`` / boolean-mask indexing), the whole batch at once.
* returns the chosen tokens' indices ascending ([B, n_keep]), i.e. in raster order.

For large ``B*N*N`` (more than ``MAX_SIM_ELEMENTS`` similarities, e.g. a 16k-token Qwen image)
the [B, N, N] matrix is not kept: the nearest-other similarities are computed in row blocks and
each pick's similarity row is one matrix-vector product (O(N*D) per step instead of O(N)).

Defaults: DivPrune has no hyperparameter besides the budget. The official repository's README
gives a retained ratio of 0.098 as its default (``keep=0.098`` here: 56 of LLaVA-1.5's 576 tokens).
Where: ``StrategySpec(features="llm")``: LLaVA-1.5 selects on the projector output (LLM width),
Qwen-VL on the merger output, LLaVA-NeXT / OneVision on the LLM-input tokens of each crop unit.
Video: the engine's default per-frame-group selection (``unit="frame"``, the budget split evenly
over a video's frame groups).

Deviations (implemented from the paper and the official README only; its code, CC BY-NC 4.0,
was not read):

* exact budget: chosen tokens are masked out of the argmin, so exactly ``n_keep`` distinct tokens
  come back even when duplicate tokens make every remaining distance 0 (a plain argmax over
  minimum distances could then return an already chosen token).
* ties: lowest index first (first pick and every step: ``argmin`` returns the first minimum).
* the greedy runs on similarities (minimise the largest similarity) instead of distances
  (maximise the smallest ``1 - cos``): the same order, without the ties that rounding ``1 - cos``
  in floating point can create; always in float32, whatever the model's dtype (bf16 models).
* LLaVA-NeXT / OneVision: the paper prunes an image's visual tokens as one set; here the engine
  splits the image's budget over its crop units (base + tiles) and DivPrune runs in each unit;
  ``image_newline`` tokens are layout, kept and not counted.
* video: per frame group (above) rather than one max–min subset over the whole clip.
* kept tokens keep their original position ids by default (the package's ``positions`` rule).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import PruneConfig
from ..registry import register_strategy
from .base import Selection, StrategySpec, VisionInfo, VisualTokens, mask_to_indices

#: largest B*N*N similarity matrix kept in memory (float32: 256 MiB); above it rows are computed per pick
MAX_SIM_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class DivPruneConfig(PruneConfig):
    """DivPrune has no parameter besides the budget (``keep`` / ``budget``); the official
    default retained ratio is ``keep=0.098`` (56 of 576 tokens on LLaVA-1.5)."""

    name = "divprune"


def divprune_select_batch(features: torch.Tensor, n_keep: int) -> torch.Tensor:
    """features [B, N, D] -> [B, n_keep] ascending indices of each image's greedy max–min
    (cosine) diverse subset; the same as :func:`divprune_select` row by row (tested)."""
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D]; got shape {tuple(features.shape)}")
    b, n, _ = features.shape
    if not 1 <= n_keep <= n:
        raise ValueError(f"n_keep must be in [1, {n}]; got {n_keep}")
    x = F.normalize(features.float(), dim=-1)
    dev = x.device
    rows = torch.arange(b, device=dev)
    if b * n * n <= MAX_SIM_ELEMENTS:
        sim = torch.bmm(x, x.transpose(1, 2))                          # [B, N, N]
        sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))              # a token is not its own neighbour
        nearest = sim.amax(dim=-1)                                     # [B, N] most similar other token

        def row(p: torch.Tensor) -> torch.Tensor:
            return sim[rows, p]                                        # [B, N] similarities to the picks
    else:
        nearest = torch.empty(b, n, device=dev)
        step = max(1, MAX_SIM_ELEMENTS // max(1, b * n))
        xt = x.transpose(1, 2)
        for s in range(0, n, step):                                    # row blocks, not a loop over N
            e = min(n, s + step)
            blk = torch.bmm(x[:, s:e], xt)                             # [B, e-s, N]
            idx = torch.arange(s, e, device=dev)
            blk[:, idx - s, idx] = float("-inf")
            nearest[:, s:e] = blk.amax(dim=-1)

        def row(p: torch.Tensor) -> torch.Tensor:
            return torch.bmm(x, x[rows, p].unsqueeze(-1)).squeeze(-1)  # [B, N]
    first = nearest.argmin(dim=-1)                                     # the most isolated token
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dev)
    chosen[rows, first] = True
    closest = row(first)                                               # largest similarity to the chosen set
    inf = torch.tensor(float("inf"), device=dev)
    for _ in range(n_keep - 1):
        pick = torch.where(chosen, inf, closest).argmin(dim=-1)        # farthest from the chosen set
        chosen[rows, pick] = True
        closest = torch.maximum(closest, row(pick))
    return mask_to_indices(chosen, n_keep)


def divprune_select(features: torch.Tensor, n_keep: int) -> torch.Tensor:
    """features [N, D] -> [n_keep] ascending indices (one image)."""
    return divprune_select_batch(features.unsqueeze(0), n_keep)[0]


def _select(cfg: DivPruneConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> Selection:
    f = tokens.require_features("divprune")
    return Selection(divprune_select(f.reshape(-1, f.shape[-1]), n_keep))


def _select_batch(cfg: DivPruneConfig, tokens: VisualTokens, n_keep: int, info: VisionInfo) -> list[Selection]:
    f = tokens.require_features("divprune")
    return [Selection(i) for i in divprune_select_batch(f.reshape(f.shape[0], -1, f.shape[-1]), n_keep)]


SPEC = register_strategy(StrategySpec(
    name="divprune", config_cls=DivPruneConfig, stage="vision", needs=frozenset({"features"}),
    requests=lambda cfg, info: [], select=_select, select_batch=_select_batch, features="llm",
    paper="Alvar et al. 2025, DivPrune, CVPR 2025, arXiv 2503.02175",
))
