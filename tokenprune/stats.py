"""Per-call statistics and an analytic prefill FLOPs estimate."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class LayerDims:
    """Matmul shapes of one transformer layer: hidden size, q/kv projection widths, MLP width,
    and whether the MLP is gated (three matrices, as Llama) or not (two, as CLIP)."""

    hidden: int
    q_dim: int
    kv_dim: int
    mlp: int
    gated: bool


def layer_flops(n_tokens: int, dims: LayerDims, causal: bool) -> float:
    """Multiply-adds x2 of one layer over ``n_tokens`` (projections, attention, MLP)."""
    n = float(n_tokens)
    proj = 2 * n * dims.hidden * (2 * dims.q_dim + 2 * dims.kv_dim)
    attn = 4 * n * n * dims.q_dim * (0.5 if causal else 1.0)
    mlp = 2 * n * dims.hidden * dims.mlp * (3 if dims.gated else 2)
    return proj + attn + mlp


@dataclass
class StageStats:
    """What one inner-LLM stage kept: from decoder ``layer`` on, ``tokens_kept`` visual tokens per
    sample, and per sample, per image / video, ``kept_indices`` (ascending, into the tokens that
    reached the LLM for that image); ``merged``: whether kept tokens carry merged states."""

    layer: int
    tokens_kept: list[int]
    kept_indices: list[list[torch.Tensor]]
    merged: bool = False      #: kept tokens carry merged hidden states (HoliTom "M", SparseVLM's recycling)
    #: the decoder layer whose attention / keys gave the signals (``layer - 1``, or the nearest
    #: full-attention layer below it in a hybrid LLM); None when the strategy reads none
    score_layer: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "tokens_kept": list(self.tokens_kept),
                "kept_indices": [[t.tolist() for t in row] for row in self.kept_indices], "merged": self.merged,
                "score_layer": self.score_layer}


@dataclass
class PruneStats:
    """Statistics of the last pruned call (prefill of a generate).

    Per sample (lists indexed by batch row): ``visual_tokens_in``, ``visual_tokens_kept`` and
    ``kept_indices`` (one LongTensor per image, ascending indices into that image's placeholder
    run, in the model's own order); ``merge_groups`` (per image, for merging strategies: [N] position
    among the image's kept grid tokens (a kept CLS prefix not counted) of the token each grid token was
    merged into, -1 if dropped; None for strategies that do not merge).
    ``visual_tokens_in`` / ``visual_tokens_kept`` count every visual placeholder that reaches the
    LLM; ``layout_tokens`` says how many of them are layout (LLaVA-NeXT / OneVision ``image_newline``
    tokens: always kept, not counted in the budget), so content tokens = in − layout → kept − layout.
    ``prune_ms``: time spent scoring, selecting and slicing
    (CPU wall clock of the hooks). ``flops_before`` / ``flops_after``: analytic prefill FLOPs
    (vision + LLM) without / with pruning.
    """

    strategy: str
    visual_tokens_in: list[int] = field(default_factory=list)
    visual_tokens_kept: list[int] = field(default_factory=list)
    kept_indices: list[list[torch.Tensor]] = field(default_factory=list)
    merge_groups: list[list[torch.Tensor | None]] = field(default_factory=list)
    layout_tokens: list[int] = field(default_factory=list)
    #: stacked strategies only: visual tokens per sample from the inner stage's layer K on
    inner_tokens_kept: list[int] | None = None
    #: stacked only: per sample, per image / video, indices (into the tokens the outer stage kept,
    #: in order) of those the inner stage keeps from layer K
    inner_kept_indices: list[list[torch.Tensor]] | None = None
    #: inner-LLM strategies: one entry per stage (one for FastV; PyramidDrop's several), in layer
    #: order; a strategy acting inside the LLM alone reports its first stage in ``visual_tokens_kept``
    stages: list[StageStats] = field(default_factory=list)
    prune_ms: float = 0.0
    flops_before: float = 0.0
    flops_after: float = 0.0
    #: counts still held as tensors, turned into the lists above when first read (so a forward
    #: does not wait for the device to report them: no host sync in the hot path)
    _pending: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)
    #: whether the call had visual tokens that reached the selection
    _filled: bool = field(default=False, repr=False, compare=False)

    def defer(self, fill: Callable[[], None]) -> None:
        self._pending.append(fill)
        self._filled = True

    def resolve(self) -> "PruneStats":
        """Compute what was deferred (idempotent); returns self."""
        while self._pending:
            self._pending.pop(0)()
        return self

    def as_dict(self) -> dict[str, Any]:
        self.resolve()
        return {
            "strategy": self.strategy,
            "visual_tokens_in": list(self.visual_tokens_in),
            "visual_tokens_kept": list(self.visual_tokens_kept),
            "kept_indices": [[t.tolist() for t in row] for row in self.kept_indices],
            "merge_groups": [[None if g is None else g.tolist() for g in row] for row in self.merge_groups],
            "layout_tokens": list(self.layout_tokens),
            "inner_tokens_kept": self.inner_tokens_kept,
            "stages": [s.as_dict() for s in self.stages],
            "prune_ms": self.prune_ms,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
        }
