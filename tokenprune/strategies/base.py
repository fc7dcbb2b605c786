"""Data passed between the engine and strategies. Pure torch; no transformers import.

A strategy is a :class:`StrategySpec`: its config class, the stage where it acts
(``"vision"``: selects before the LLM, from vision-encoder attention / features;
``"llm"``: selects inside the LLM at a decoder layer), what it needs from a family, the score
requests it makes, and a ``select`` function from :class:`VisualTokens` to a :class:`Selection`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Literal, TypeVar

import torch

from ..config import ConfigError, PruneConfig

#: capabilities a family can provide and a strategy can need
CAPABILITIES = ("cls_attention", "mean_attention", "keys", "features", "llm_attention", "video")

ScoreKind = Literal["cls", "mean", "keys"]


@dataclass(frozen=True)
class VisionInfo:
    """What a strategy may know about the vision encoder (filled by the family).

    ``num_layers``: encoder layers; ``feature_layer``: 0-based index of the layer whose output
    feeds the projector (LLaVA-1.5: 22 of 24); ``grid``: (rows, cols) of one image's tokens.
    """

    num_layers: int
    feature_layer: int
    grid: tuple[int, int]
    has_cls: bool
    #: family's default 1-based "object" layer for layer-pair methods (HiPrune); None: scale CLIP's
    object_layer: int | None = None


@dataclass(frozen=True)
class LLMInfo:
    num_layers: int


@dataclass(frozen=True)
class ScoreRequest:
    """Ask the engine for one reduction of one vision layer's attention.

    ``kind``: ``"cls"`` = the CLS query row (head mean), ``"mean"`` = attention each token
    receives, averaged over heads and all query rows, ``"keys"`` = head-mean keys.
    """

    layer: int
    kind: ScoreKind


@dataclass
class VisualTokens:
    """One image's tokens as a strategy sees them (CLS column already removed).

    ``grid``: (h, w); ``features``: [N, D] at the selection point (``StrategySpec.features``) (N = h*w);
    ``scores[(layer, kind)]``: [N] for "cls"/"mean", [N, d] for "keys".
    """

    grid: tuple[int, int]
    features: torch.Tensor | None
    scores: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    #: video strategies (``unit="video"``): frames of ``grid`` each, frame-major (N = frames*h*w)
    frames: int = 1


@dataclass
class Selection:
    """Result for one image: ``indices`` [n] ascending into the image's tokens; optional
    ``features`` [n, D] that replace the features at those indices (merging strategies), and
    ``groups`` [N]: for every token of the image, the position in ``indices`` of the kept token
    that carries it (itself if kept, its merge target if merged, -1 if dropped)."""

    indices: torch.Tensor
    features: torch.Tensor | None = None
    groups: torch.Tensor | None = None


C = TypeVar("C", bound=PruneConfig)


@dataclass(frozen=True)
class StrategySpec(Generic[C]):
    """A strategy: generic over its config class ``C`` (every function receives a ``C``)."""

    name: str
    config_cls: type[C]
    stage: Literal["vision", "llm"]
    needs: frozenset[str]
    #: vision stage: score requests for a config and encoder
    requests: Callable[[C, VisionInfo], list[ScoreRequest]] | None = None
    #: vision stage: (config, tokens, n_keep, info) -> Selection
    select: Callable[[C, VisualTokens, int, VisionInfo], Selection] | None = None
    #: vision stage, optional: the same selection for a batch of images at once (VisualTokens
    #: with [B, ...] tensors -> one Selection per image); avoids a Python loop and host syncs per image
    select_batch: Callable[[C, VisualTokens, int, VisionInfo], list[Selection] | None] | None = None
    #: llm stage: decoder layer index K where tokens are dropped (scores from layer K-1)
    llm_layer: Callable[[C, LLMInfo], int] | None = None
    #: llm stage: (config, last-query attention row over one image's tokens [N], n_keep) -> indices
    select_llm: Callable[[C, torch.Tensor, int], torch.Tensor] | None = None
    #: llm stage, optional: (config, hidden [N, D] of one image's tokens at layer K, kept indices [n])
    #: -> [n, D] hidden states of the kept tokens with the dropped ones merged in (HoliTom's "M")
    merge_llm: Callable[[C, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    #: "frame": select in every image / frame group on its own (budget split evenly over a
    #: video's frame groups); "video": one call per video with all its frames (``VisualTokens.frames``)
    unit: Literal["frame", "video"] = "frame"
    #: "select": images are pruned too; "keep": images pass through unchanged (video-only methods)
    images: Literal["select", "keep"] = "select"
    #: what ``VisualTokens.features`` holds: "encoder" = the family's selection point (LLaVA-1.5:
    #: the projector input, vision-encoder space; Qwen-VL and the anyres families: the LLM-input
    #: tokens); "llm" = always the LLM-input (projected) tokens, so LLaVA-1.5 selects on the
    #: projector's output (methods defined on the LLM's visual tokens, e.g. DivPrune)
    features: Literal["encoder", "llm"] = "encoder"
    #: for a vision-stage method with its own inner-LLM stage (HoliTom's "M"): config ->
    #: (inner strategy name, its parameters), or None when switched off
    inner: Callable[[C], "tuple[str, dict[str, Any]] | None"] | None = None
    paper: str = ""


def attention_kind(choice: str, info: VisionInfo, option: str, error: type[Exception] = ConfigError) -> ScoreKind:
    """The score kind an ``"auto" | "cls" | "mean"`` option means for this encoder: ``"auto"`` is
    CLS attention where the tower has a CLS token, else the mean attention each token receives;
    an explicit ``"cls"`` on a tower without one raises ``error`` naming ``option``."""
    if choice == "auto":
        return "cls" if info.has_cls else "mean"
    if choice == "cls" and not info.has_cls:
        raise error(f"{option}='cls' needs a vision tower with a CLS token; this one has none (use 'mean' or 'auto')")
    return choice  # type: ignore[return-value]


def rank_desc(score: torch.Tensor) -> torch.Tensor:
    """[..., N] -> rank of every entry in descending order along the last dim (ties: lower index
    first, as :func:`topk_indices`)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return rank


def mask_to_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] bool with exactly k True per row -> [B, k] ascending indices, without a host sync."""
    n = mask.shape[-1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.sort(torch.where(mask, idx, idx + n), dim=-1).values[:, :k]


def topk_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """[..., N] -> [..., k] indices of the k largest values along the last dim, in descending
    order, ties broken by the lower index (deterministic).

    ``torch.topk`` leaves the order of ties unspecified; a stable descending sort does not.
    """
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return order[..., :max(k, 0)]
