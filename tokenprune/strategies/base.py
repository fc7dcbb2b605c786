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

#: what an inner-LLM strategy can ask the engine for at each of its stages (see :class:`LLMTokens`)
LLMSignal = Literal["attention", "text_attention", "keys", "hidden", "embeds"]
LLM_SIGNALS: tuple[str, ...] = ("attention", "text_attention", "keys", "hidden", "embeds")


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
    """``num_layers``: decoder layers; ``min_layer``: the first layer an inner stage may cut at
    (DeepStack families add visual features inside the layers before it)."""

    num_layers: int
    min_layer: int = 1


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
    #: instruction-conditioned strategies (``StrategySpec.text``): [T, D] LLM-input embeddings of the
    #: text tokens after the image in its row (the instruction and the chat template's suffix; other
    #: images' tokens left out); T may be 0
    text: torch.Tensor | None = None

    def require_features(self, strategy: str) -> torch.Tensor:
        """``features``, or a ValueError naming the strategy that needs them."""
        if self.features is None:
            raise ValueError(f"{strategy} needs the visual features")
        return self.features


@dataclass
class LLMTokens:
    """One image's (or video's) visual tokens still in the sequence at an inner-LLM stage, as a
    strategy sees them: N candidates in sequence order (a kept CLS prefix and layout tokens are not
    candidates), and the T text tokens that follow the run in its row (the instruction; other
    images' tokens excluded). Only the signals the spec's ``llm_signals`` names are filled.

    ``attention`` [N]: head-mean softmax row of the row's last prompt token at layer K-1 (the
    softmax runs over every key it sees, so it does not sum to 1 over N); ``text_attention`` [T, N]:
    the same rows for the T text tokens; ``keys`` [N, Hkv*d] / ``text_keys`` [T, Hkv*d]: layer K-1's
    keys (rotary applied, heads concatenated); ``hidden`` [N, D] / ``text_hidden`` [T, D]: the hidden
    states entering layer K (the output of layer K-1, before layer K's norm). ``stage``: 0-based
    stage; ``n_in``: the run's candidates before the first stage."""

    stage: int
    n_in: int
    attention: torch.Tensor | None = None
    text_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text_keys: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    text_hidden: torch.Tensor | None = None
    #: with "hidden": the LLM's final norm ([..., D] -> [..., D]), for methods that compare hidden
    #: states as the model's output head would see them (DART)
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: with "embeds": the LLM-input embeddings of *all* the run's n_in candidates (stage 0's set,
    #: whatever earlier stages dropped) [n_in, D] and of the T text tokens [T, D]
    embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    #: with "embeds": positions of the current N candidates among the n_in (``embeds[alive]``)
    alive: torch.Tensor | None = None


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
    #: llm stage: decoder layer index K where tokens are dropped (signals from layer K-1), or
    #: several increasing K for a multi-stage method (each stage re-selects among the survivors)
    llm_layer: Callable[[C, LLMInfo], "int | list[int]"] | None = None
    #: llm stage: (config, the image's candidates at this stage, n_keep) -> [n_keep] indices into
    #: the candidates (any order), or a :class:`Selection` whose ``features`` [n_keep, D] replace the
    #: kept tokens' hidden states (a merging rule, e.g. SparseVLM's recycling)
    select_llm: Callable[[C, "LLMTokens", int], "torch.Tensor | Selection"] | None = None
    #: llm stage: the signals ``select_llm`` reads (the engine computes only these)
    llm_signals: frozenset[str] = frozenset({"attention"})
    #: llm stage, optional: (config, stage, first, n_in) -> tokens stage ``stage`` keeps of an image
    #: of ``n_in`` candidates whose first stage keeps ``first`` (what ``keep``/``budget`` give);
    #: None: ``first`` at every stage
    llm_budget: Callable[[C, int, int, int], int] | None = None
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
    #: vision stage: the selection reads the instruction (``VisualTokens.text``), so the engine
    #: selects at the LLM input, where the prompt is known (needs ``features="llm"``; no merging)
    text: bool = False
    #: for a vision-stage method with its own inner-LLM stage (HoliTom's "M"): config ->
    #: (inner strategy name, its parameters), or None when switched off
    inner: Callable[[C], "tuple[str, dict[str, Any]] | None"] | None = None
    paper: str = ""


def scaled_layers(paper: tuple[int, ...], depth: int, info: LLMInfo, option: str = "layers") -> list[int]:
    """A method's stage layers given for a ``depth``-layer LLM, scaled to this one's: each rounded
    to the same relative depth, at least 1 and above the previous; stages that would start past
    layer ``num_layers - 1`` are left out (an LLM too shallow for all of them). Raises
    :class:`ConfigError` when not even one fits."""
    n = info.num_layers
    out: list[int] = []
    for k in paper:
        k = max(info.min_layer, round(k * n / depth), (out[-1] + 1) if out else 1)
        if k >= n:
            break
        out.append(k)
    if not out:
        raise ConfigError(f"an LLM of {n} layer(s) is too shallow for an inner stage; pass {option}= "
                          f"explicitly (increasing, within 1..{n - 1})")
    return out


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
