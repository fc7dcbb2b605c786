"""Gemma 3 family: ``Gemma3ForConditionalGeneration`` (model_type ``gemma3``).

Knowledge held here:

* The tower is SigLIP without a CLS token (``model.model.vision_tower``, its encoder layers found as
  for LLaVA); every image of a call — pan-and-scan crops included — is one row of one batch, a
  fixed P x P patch grid (P = image_size / patch_size). The projector feeds the LLM the tower's
  last hidden state (after ``post_layernorm``), so the feature layer is the last encoder layer.
* ``Gemma3MultiModalProjector`` average-pools the P x P patch map with ``avg_pool`` (k x k windows,
  k = P / sqrt(mm_tokens_per_image)), then norms and projects: a fixed G x G grid of LLM-space tokens
  per image (G = P / k; 16 x 16 = 256 in the released models). Selection happens on the projector's
  output (``select_on_output``), in that grid. Scores come from the hooked q/k of the requested
  encoder layers (attention received, averaged over heads and query rows, or head-mean keys; never
  a CLS row), and are pooled over the same windows by the projector's own ``avg_pool`` module: a
  token's score is the mean of its k x k patches' scores, as its feature is their mean.
* Placeholders: ``image_token_id`` (``<image_soft_token>``), mm_tokens_per_image per image, each
  run between ``<start_of_image>`` and ``<end_of_image>``. Pan-and-scan: the processor sends an
  image's thumbnail then its crops as images of the same prompt (``pixel_values`` rows in that
  order, one placeholder run each, text between them): each is its own image with its own budget.
* The LLM's masks: ``Gemma3Model`` builds them *before* its language model, one per layer type
  (``{"full_attention": ..., "sliding_attention": ...}``), with ``token_type_ids`` making the tokens
  of one image attend to each other bidirectionally (a block per contiguous run of type 1), sliding
  layers adding their window. The engine cuts the LLM input; we then rebuild that dict for the
  kept tokens with the model's own ``create_masks_for_generate``: the kept tokens' token types are
  read from the mask the model built (a token is in an image block when a key after it, or a query
  before it, sees it — only a block allows that), so whatever ``token_type_ids`` the call carried
  (or none) is followed; the padding mask, positions and cache are the pruned ones. That is the
  unpatched model fed the kept tokens: blocks of the kept image tokens, sliding windows counted in
  the kept sequence (as the sliding KV cache counts them at decode). Decode steps get no token
  types (the model passes none after prefill) and a 2D mask, from which the LLM builds its own.
* No inner-LLM strategy (no ``llm_attention``): the sliding layers' KV cache keeps the last
  ``sliding_window`` tokens of each layer's own sequence, while the model builds one sliding mask
  per step, sized for the uncut first sliding layer — past the window, layers >= K would get masks
  that do not match their (cut) cache, which no family hook can correct (the inner stage slices
  each layer's mask in the uncut numbering; it also reads padding from a 2D mask, where Gemma 3's
  language model gets the per-layer-type dict, and q/k are normed after the head split, in
  [B, H, L, d]). Such strategies are refused with IncompatibleStrategyError at apply, as are
  video methods and CLS-attention ones (no ``video``, no ``cls_attention``).
* Overlay: the base class's fixed grid — the first image's G x G tokens tiling the whole image
  (the image processor resizes to height x width, no crop); with pan-and-scan the first image is
  the thumbnail of the whole image. ``budget`` / ``keep`` apply to each image (each crop).
* Refused at apply (UnsupportedModelError): flex attention (its BlockMask carries no padding we can
  read or cut) and ``use_bidirectional_attention`` (the language model would make text
  bidirectional where the multimodal model does not).
"""
from __future__ import annotations

from typing import Any

import torch

from tokenprune.errors import UnsupportedModelError
from tokenprune.family import Family, ImageLayout, LLMAttention, VisionAttention
from tokenprune.registry import register_family
from tokenprune.sequence import cache_of, take
from tokenprune.stats import LayerDims
from tokenprune.strategies.base import LLMInfo, VisionInfo

from .llava import clip_attention, llava_core, vision_encoder_layers


def image_blocks(full: Any, length: int) -> torch.Tensor | None:
    """[B, length] bool: the prefill tokens in a bidirectional block of a full-attention mask
    [B, 1, Q, K] (bool, or additive float with 0 = attend), i.e. seen by a query before them or
    seeing a key after them; None when there is none (or no mask: the kernel's causal path)."""
    if not torch.is_tensor(full) or full.dim() != 4:
        return None
    m = full[:, 0, :length, :length]
    ok = m if m.dtype == torch.bool else m == 0
    ahead = torch.triu(ok, diagonal=1)
    members = ahead.any(-1) | ahead.any(-2)
    return members if bool(members.any()) else None


@register_family
class Gemma3Family(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    select_on_output = True

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        core = llava_core(self, model, "gemma3", "Gemma3ForConditionalGeneration")
        cfg = model.config
        tcfg = cfg.text_config
        impl = getattr(tcfg, "_attn_implementation", None)
        if impl == "flex_attention":
            raise UnsupportedModelError(
                "Gemma 3 with flex attention: its masks are BlockMasks, whose padding and image blocks cannot be "
                "read or cut for the kept tokens; load it with attn_implementation='sdpa' or 'eager'")
        if getattr(tcfg, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                "Gemma 3 with use_bidirectional_attention=True: its language model would make the pruned prompt's "
                "text bidirectional, which the multimodal model's own masks are not")
        self._vision_layers = vision_encoder_layers(core.vision_tower)
        #: patches a side of the tower's grid, and of one pooling window
        self.patches = int(self.projector.patches_per_image)
        self.kernel = int(self.projector.kernel_size)
        side = self.patches // self.kernel
        if side * side != int(cfg.mm_tokens_per_image):
            raise UnsupportedModelError(
                f"Gemma 3 projector pools {self.patches}x{self.patches} patches into {side}x{side} tokens, but "
                f"mm_tokens_per_image is {cfg.mm_tokens_per_image}")
        n_layers = len(self._vision_layers)
        self.num_prefix = 0
        self.vision_info = VisionInfo(num_layers=n_layers, feature_layer=n_layers - 1, grid=(side, side),
                                      has_cls=False)
        self.llm_info = LLMInfo(num_layers=len(self.decoder_layers))
        self.image_token_id = int(cfg.image_token_id)
        self.provides = frozenset({"features", "mean_attention", "keys"})

    # --- vision ------------------------------------------------------------------------------
    def vision_attention(self, layer: int) -> VisionAttention:
        return clip_attention(self._vision_layers[layer])

    def pool_scores(self, v: torch.Tensor) -> torch.Tensor:
        """Per-patch scores [n, P*P] or [n, P*P, d] -> per-token [n, G*G] / [n, G*G, d], averaged over
        the projector's pooling windows by its own ``avg_pool`` (raster order, as the features)."""
        n, p = v.shape[0], self.patches
        maps = v.reshape(n, 1, p, p) if v.dim() == 2 else v.transpose(1, 2).reshape(n, v.shape[-1], p, p)
        pooled = self.projector.avg_pool(maps.contiguous()).flatten(2).transpose(1, 2)   # [n, G*G, c]
        return pooled[..., 0] if v.dim() == 2 else pooled

    def vision_layout(self, x: torch.Tensor, scores: dict[tuple[int, str], torch.Tensor],
                      meta: Any, per_frame: bool = True) -> tuple[torch.Tensor, list[ImageLayout]]:
        pooled = {key: self.pool_scores(v) for key, v in scores.items()}
        return super().vision_layout(x, pooled, meta, per_frame)

    def vision_segments(self, args: tuple, kwargs: dict[str, Any], counts: dict[str, list[int]]) -> list[int]:
        return [self.patches * self.patches] * len(counts.get("image", []))

    def vision_dims(self) -> tuple[LayerDims, int, int]:
        v = self.model.config.vision_config
        dims = LayerDims(hidden=v.hidden_size, q_dim=v.hidden_size, kv_dim=v.hidden_size,
                         mlp=v.intermediate_size, gated=False)
        return dims, self.vision_info.num_layers, self.patches * self.patches

    # --- LLM ---------------------------------------------------------------------------------
    def prune_lm_kwargs(self, new: dict[str, Any], kwargs: dict[str, Any], keep: torch.Tensor,
                        idx: torch.Tensor) -> None:
        """The per-layer-type masks of the kept tokens, built by the model's own function from the
        kept tokens' padding, positions, cache and token types (read from the mask it built)."""
        masks = kwargs.get("attention_mask")
        if not isinstance(masks, dict):
            return      # the language model called directly with a 2D mask: it builds its own
        from transformers import Gemma3ForConditionalGeneration

        blocks = image_blocks(masks.get("full_attention"), keep.shape[1])
        types = None if blocks is None else take(blocks.long(), idx, 1, 0)
        embeds = new["inputs_embeds"]
        # positional: the cache argument is ``past_key_values`` before transformers 5.2x, ``cache`` after
        new["attention_mask"] = Gemma3ForConditionalGeneration.create_masks_for_generate(
            self.model.config, embeds, new["attention_mask"], cache_of(kwargs), new["position_ids"],
            None if types is None else types.to(embeds.device))

    def llm_attention(self, layer: int) -> LLMAttention:
        raise UnsupportedModelError(
            "Gemma 3 serves no inner-LLM strategy: the sliding-window layers' KV cache keeps the last "
            "sliding_window tokens of each layer's own (cut) sequence, which the model's single sliding mask per "
            "step does not describe past the window")

    def llm_dims(self) -> tuple[LayerDims, int]:
        t = self.model.config.text_config
        hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        dims = LayerDims(hidden=t.hidden_size, q_dim=t.num_attention_heads * hd,
                         kv_dim=t.num_key_value_heads * hd, mlp=t.intermediate_size, gated=True)
        return dims, t.num_hidden_layers

    # --- bench / presentation ---------------------------------------------------------------
    def bench_inputs(self, batch: int, text_tokens: int, size: tuple[int, int] | None = None,
                     video_frames: int | None = None) -> dict[str, torch.Tensor]:
        """The fixed-grid rows of the base class, with ``token_type_ids`` (the image block)."""
        out = super().bench_inputs(batch, text_tokens, size, video_frames)
        out["token_type_ids"] = (out["input_ids"] == self.image_token_id).long()
        return out
