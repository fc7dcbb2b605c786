"""The interface a model-family adapter (in ``tokenprune.patches``) implements.

A family holds all knowledge of one model family: where its modules are, the vision grid,
CLS presence, placeholder layout, how to get q/k of an attention layer and apply its rotary.
The engine only talks to this interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar

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


@dataclass
class Unit:
    """What one strategy call selects within: one image, or one frame group of a video.

    ``rows``: [N] rows of the flattened tensor at the selection point holding the unit's tokens in
    placeholder (raster) order; ``grid``: (h, w) with h*w = N; ``scores``: (layer, kind) ->
    [N] or [N, d], already mapped to those tokens.
    """

    rows: torch.Tensor
    grid: tuple[int, int]
    scores: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    frames: int = 1          #: a whole video as one unit: ``frames`` grids, frame-major
    #: positions of the unit's tokens inside the image's placeholder run (None: right after the
    #: prefix and the previous units)
    span_pos: torch.Tensor | None = None
    #: share of the image's budget relative to the other units (e.g. crops it covers)
    weight: float = 1.0


@dataclass
class ImageLayout:
    """One image (or video) as its placeholder run sees it: ``prefix`` tokens that are always
    kept (a CLS placeholder), then the units' tokens one after another."""

    prefix: int
    units: list[Unit]
    #: placeholder positions always kept and not counted in the budget (LLaVA-NeXT newlines)
    fixed: torch.Tensor | None = None
    length: int | None = None   #: the run's length when units do not tile it (newlines)

    @property
    def n_tokens(self) -> int:
        if self.length is not None:
            return self.length
        return self.prefix + sum(u.rows.numel() for u in self.units)


StoreFn = Callable[[int, Callable[[], dict[str, torch.Tensor]]], None]
ScratchFn = Callable[[], "dict[Any, Any] | None"]


class Family:
    """Base class of family adapters. Subclasses set the class attributes and the properties.

    The defaults describe a LLaVA-1.5-like model: one fixed grid per image, selection at the
    projector input ``[n_img, prefix + h*w, D]``, vision q/k from ``vision_attention(layer)``.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: Any) -> None:
        #: the model (a transformers ``PreTrainedModel``: its submodules and config are reached by
        #: attribute, so it is held as ``Any``)
        self.model: Any = model

    # --- modules ---------------------------------------------------------------------------
    outer: Any                  #: receives input_ids / pixel_values (e.g. ``model.model``)
    vision_tower: Any           #: one call encodes all images of a request
    projector: Any              #: input = per-image vision features [n_img, N, D]
    language_model: Any         #: receives inputs_embeds with image features scattered in
    decoder_layers: Any         #: the LLM's decoder layers (an ``nn.ModuleList``)

    # --- facts -----------------------------------------------------------------------------
    provides: frozenset[str]
    vision_info: VisionInfo
    llm_info: LLMInfo
    image_token_id: int
    num_prefix: int             #: placeholder tokens per image before the grid (a kept CLS)

    #: which call argument carries the pixels of each modality (encoder calls come in this order)
    pixel_keys: ClassVar[dict[str, str]] = {"image": "pixel_values"}
    #: True: select on the output of ``selection_module`` (Qwen merger), False: on its input
    select_on_output: ClassVar[bool] = False
    #: True: keep the encoder's scores and select at the LLM input, in the placeholder layout
    #: the model builds after the projector (see :meth:`lm_layouts`)
    select_at_lm: ClassVar[bool] = False
    #: inner-LLM strategies must drop tokens at this decoder layer or later
    min_inner_layer: int = 1
    #: whether every decoder layer can hide a key by the attention mask; False (linear-attention
    #: layers): an inner cut cannot pad rows with masked "ghost" tokens, so inner-LLM strategies
    #: take one row per call (a batch whose rows would drop different numbers of tokens is refused
    #: with a typed error before the LLM runs; rows that drop equally many, as beam search's
    #: copies, need no ghosts and run batched)
    inner_ghosts: ClassVar[bool] = True
    #: whether ``positions="compact"`` (renumbering kept tokens) is meaningful for this family
    supports_compact: ClassVar[bool] = True
    #: True: the processor takes video, but the model sees its frames as images (InternVL: one-tile
    #: images, no video modality), so the CLI / demo accept a clip and each frame is pruned as an image
    video_frames_as_images: ClassVar[bool] = False

    @property
    def takes_video(self) -> bool:
        """Whether a clip is a valid input (a video modality, or frames fed as images)."""
        return "video" in self.provides or self.video_frames_as_images

    @property
    def selection_module(self) -> nn.Module:
        return self.projector

    @property
    def tokens_per_image(self) -> int | None:
        """Placeholder tokens per image when fixed by the config (None: depends on the image)."""
        h, w = self.vision_info.grid
        return h * w + self.num_prefix

    # --- vision stage ------------------------------------------------------------------------
    def install_vision_capture(self, layer: int, kinds: set[str], store: StoreFn,
                               scratch: ScratchFn) -> list[Any]:
        """Hook encoder layer ``layer`` so that ``store(layer, compute)`` is called once per pass,
        ``compute()`` returning the requested reductions per image ([n_img, P+N] / [n_img, P+N, d]).
        ``scratch()`` is the current pass's private dict (None outside a patched pass): captured
        tensors go there, never on modules, so concurrent threads stay apart."""
        va = self.vision_attention(layer)
        # partials of methods, not closures: ``copy.deepcopy(model)`` then binds the copy's hooks
        # to the copied family and handle
        return [va.q_source.register_forward_hook(partial(self._grab_vision, layer, "q", scratch)),
                va.k_source.register_forward_hook(partial(self._grab_vision, layer, "k", scratch)),
                va.module.register_forward_hook(partial(self._vision_done, layer, frozenset(kinds), store, scratch))]

    @staticmethod
    def _grab_vision(layer: int, which: str, scratch: ScratchFn, module: nn.Module, args: tuple,
                     output: torch.Tensor) -> None:
        box = scratch()
        if box is not None:
            box[(layer, which)] = output

    def _vision_done(self, layer: int, kinds: frozenset[str], store: StoreFn, scratch: ScratchFn,
                     module: nn.Module, args: tuple, output: Any) -> None:
        from .attention import vision_reductions

        box = scratch()
        if box is not None and (layer, "q") in box and (layer, "k") in box:
            va = self.vision_attention(layer)
            q, k = box.pop((layer, "q")), box.pop((layer, "k"))
            store(layer, lambda: vision_reductions(q, k, va.num_heads, va.scale, set(kinds)))

    def vision_capture_modules(self, layer: int) -> list[nn.Module]:
        """The modules :meth:`install_vision_capture` hooks for ``layer`` (resolved before any hook
        is installed, so a model without them is refused untouched)."""
        va = self.vision_attention(layer)
        return [va.q_source, va.k_source, va.module]

    def vision_begin(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Per-pass facts read from the encoder call (e.g. Qwen's grid_thw); None here."""
        return None

    def vision_layout(self, x: torch.Tensor, scores: dict[tuple[int, str], torch.Tensor],
                      meta: Any, per_frame: bool = True) -> tuple[torch.Tensor, list[ImageLayout]]:
        """Flatten the selection-point tensor to [R, D] and describe each image's units
        (``per_frame=False``: a video is one unit with all its frames)."""
        n_img, n, d = x.shape
        p = self.num_prefix
        cls_off = 1 if self.vision_info.has_cls else 0
        out = []
        for i in range(n_img):
            rows = torch.arange(i * n + p, (i + 1) * n, device=x.device)
            sc = {key: v[i, cls_off:] for key, v in scores.items()}
            out.append(ImageLayout(prefix=p, units=[Unit(rows=rows, grid=self.vision_info.grid, scores=sc)]))
        return x.reshape(n_img * n, d), out

    def vision_restore(self, flat: torch.Tensor, x: torch.Tensor, meta: Any) -> torch.Tensor:
        return flat.reshape(x.shape)

    def image_outputs(self, output: torch.Tensor, layouts: list[ImageLayout], meta: Any) -> list[torch.Tensor]:
        """Per-image rows of the projector output as the model scatters them (to recognise
        pre-computed encoder outputs)."""
        return [output[i] for i in range(output.shape[0])]


    def lm_layouts(self, modality: str, spans: list[Any], embeds: torch.Tensor, raws: list[Any],
                   per_frame: bool = True) -> list[ImageLayout]:
        """Select-at-LLM families: one layout per placeholder run of ``modality`` whose units'
        ``rows`` index ``embeds.reshape(-1, D)``; ``raws``: (scores, projector output) of the
        encoder passes of that modality, in order."""
        raise NotImplementedError

    def fixed_grid_images(self, kwargs: dict[str, Any]) -> int | None:
        """Fixed-grid families: the number of images of a call, read from the inputs' shape (the
        pixels' first dimension, or the pre-computed encodings); None where it is not that simple."""
        if self.tokens_per_image is None:
            return None
        px = kwargs.get(self.pixel_keys["image"])
        if torch.is_tensor(px) and px.dim() == 4:
            return int(px.shape[0])
        given = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        pooled = getattr(given, "pooler_output", None)
        return len(pooled) if pooled is not None else None

    def llm_scoring_layer(self, layer: int) -> int:
        """The decoder layer whose q/k an inner stage reads when it asks for ``layer`` (= K-1):
        itself here; hybrid LLMs map a linear-attention layer to the nearest full-attention layer
        at or below it, and raise :class:`~tokenprune.errors.ConfigError` when there is none."""
        return layer

    def llm_final_norm(self) -> Any:
        """The language model's final norm (applied before the output head), or None."""
        return getattr(self.language_model, "norm", None)

    def structural(self, spans: list[Any], embeds: torch.Tensor) -> list[torch.Tensor]:
        """Per placeholder run, positions that are layout rather than content (LLaVA-NeXT's newline
        tokens): inner-LLM strategies keep them and do not count them in the budget."""
        return [torch.zeros(0, dtype=torch.long) for _ in spans]

    # --- LLM input -----------------------------------------------------------------------------
    def placeholder_counts(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, list[int]] | None:
        """Placeholder tokens of each image / video of a call, in encoder order (None: fixed
        ``tokens_per_image``)."""
        return None

    def vision_segments(self, args: tuple, kwargs: dict[str, Any], counts: dict[str, list[int]]) -> list[int]:
        """Tokens of each attention segment the vision encoder runs for a call (FLOPs estimate)."""
        h, w = self.vision_info.grid
        return [h * w + (1 if self.vision_info.has_cls else 0)] * len(counts.get("image", []))

    def placeholder_masks(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        mask = self.visual_mask(args, kwargs)
        return {} if mask is None else {"image": mask}

    def prune_lm_kwargs(self, new: dict[str, Any], kwargs: dict[str, Any], keep: torch.Tensor,
                        idx: torch.Tensor) -> None:
        """Slice family-specific language-model arguments to the kept tokens (in place on ``new``)."""

    def vision_attention(self, layer: int) -> VisionAttention:
        raise NotImplementedError

    def llm_attention(self, layer: int) -> LLMAttention:
        raise NotImplementedError

    def input_ids(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The ``input_ids`` of a call of ``outer``."""
        return kwargs.get("input_ids", args[0] if args else None)

    def visual_mask(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """[B, L] bool: placeholder positions of image tokens in a call of ``outer``."""
        return self.token_mask(args, kwargs, self.image_token_id)

    def token_mask(self, args: tuple, kwargs: dict[str, Any], token_id: int) -> torch.Tensor | None:
        """[B, L] bool: where a call of ``outer`` has ``token_id`` (from ``input_ids``, or by
        comparing ``inputs_embeds`` with that token's embedding)."""
        ids = self.input_ids(args, kwargs)
        if ids is not None:
            return ids == token_id
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        emb = self.outer.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
        return (embeds == emb).all(-1)

    def vision_dims(self) -> tuple[LayerDims, int, int]:
        """(dims, layers run, tokens per encoder pass incl. CLS)."""
        raise NotImplementedError

    # --- benchmark inputs: the family's own input geometry -----------------------------------
    def bench_inputs(self, batch: int, text_tokens: int, size: tuple[int, int] | None = None,
                     video_frames: int | None = None) -> dict[str, torch.Tensor]:
        """Synthetic inputs of ``batch`` equal rows for the speed bench (CPU, float32): one image per
        row (``size`` is the family's own measure of it; a fixed grid ignores it), or a clip of
        ``video_frames`` frames. Default: a fixed grid per image."""
        from .eval.tiny import placeholder_batch

        if video_frames:
            raise NotImplementedError(f"{self.name} takes no video input")
        cfg = self.model.config
        side = int(cfg.vision_config.image_size)
        n = self.tokens_per_image
        assert n is not None
        return placeholder_batch(n, self.image_token_id, batch, text_tokens, cfg.text_config.vocab_size,
                                 (3, side, side), "pixel_values")

    # --- presentation (CLI, demo): the family's geometry, so no caller branches on its name ----
    def video_processor_kwargs(self, video: Any) -> dict[str, Any]:
        """Extra processor keywords for a video input ((T, H, W, 3) frames); none by default."""
        return {}

    def image_overlay(self, image: Any, kept: torch.Tensor | None, merge_groups: torch.Tensor | None,
                      processor: Any, inputs: dict[str, Any]) -> Any:
        """The first image's kept tokens drawn on it (PIL in, PIL out); ``kept`` None: unpruned.

        Default: a fixed grid after the processor's resize / crop (LLaVA-1.5); a kept CLS
        placeholder has no box."""
        from .visualize import llava_boxes, overlay

        boxes = llava_boxes(image.size, self.vision_info.grid, processor.image_processor)
        if kept is None:
            return overlay(image, torch.arange(boxes.shape[0]), boxes, outline=False)
        p = self.num_prefix
        return overlay(image, kept[kept >= p] - p, boxes, merge_groups)

    def video_overlay(self, frames: list[Any], kept: torch.Tensor | None, n_tokens: int, processor: Any,
                      inputs: dict[str, Any]) -> Any:
        """The video's kept tokens on its frames (one panel per token frame)."""
        raise NotImplementedError(f"{self.name} takes no video input")

    def llm_dims(self) -> tuple[LayerDims, int]:
        raise NotImplementedError
