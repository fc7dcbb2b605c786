"""The interface a model-family adapter (in ``tokenprune.patches``) implements.

A family holds all knowledge of one model family: where its modules are, the vision grid,
CLS presence, placeholder layout, how to get q/k of an attention layer and apply its rotary.
The engine only talks to this interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from .stats import LayerDims
from .strategies.base import LLMInfo, VisionInfo


@dataclass(frozen=True)
class VisionAttention:
    """Where one encoder layer's q/k come from: modules whose outputs are [B, N, H*d]."""

    module: nn.Module
    q_source: nn.Module
    k_source: nn.Module
    num_heads: int
    scale: float


@dataclass(frozen=True)
class LLMAttention:
    """One decoder layer's attention: q/k sources give [B, L, H*d] / [B, L, Hkv*d] (or already
    head-split [B, L, H, d] when ``split_heads`` is False), ``rotary(x, cos, sin)`` rotates a
    [B, H, L, d] tensor with [B, L, d] cos/sin."""

    module: nn.Module
    q_source: nn.Module
    k_source: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Family:
    """Base class of family adapters. Subclasses set the class attributes and the properties."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- modules ---------------------------------------------------------------------------
    outer: nn.Module            #: receives input_ids / pixel_values (e.g. ``model.model``)
    vision_tower: nn.Module     #: one call encodes all images of a request
    projector: nn.Module        #: input = per-image vision features [n_img, N, D]
    language_model: nn.Module   #: receives inputs_embeds with image features scattered in
    decoder_layers: Sequence[nn.Module]

    # --- facts -----------------------------------------------------------------------------
    provides: frozenset[str]
    vision_info: VisionInfo
    llm_info: LLMInfo
    image_token_id: int
    num_prefix: int             #: placeholder tokens per image before the grid (a kept CLS)

    @property
    def tokens_per_image(self) -> int:
        h, w = self.vision_info.grid
        return h * w + self.num_prefix

    def vision_attention(self, layer: int) -> VisionAttention:
        raise NotImplementedError

    def llm_attention(self, layer: int) -> LLMAttention:
        raise NotImplementedError

    def input_ids(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The ``input_ids`` of a call of ``outer``."""
        return kwargs.get("input_ids", args[0] if args else None)

    def visual_mask(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """[B, L] bool: placeholder positions of image tokens in a call of ``outer``."""
        ids = self.input_ids(args, kwargs)
        if ids is not None:
            return ids == self.image_token_id
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        emb = self.outer.get_input_embeddings()(
            torch.tensor(self.image_token_id, device=embeds.device))
        return (embeds == emb).all(-1)

    def vision_dims(self) -> tuple[LayerDims, int, int]:
        """(dims, layers run, tokens per encoder pass incl. CLS)."""
        raise NotImplementedError

    def llm_dims(self) -> tuple[LayerDims, int]:
        raise NotImplementedError
