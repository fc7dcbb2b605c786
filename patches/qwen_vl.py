"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL families (model_type ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``).

Knowledge held here:

* The vision tower (``model.model.visual``) encodes every image / video of a call as one flat
  sequence of patches ``[S, C*T*p*p]`` with ``grid_thw`` rows (t, h, w); 2x2 neighbouring
  patches are consecutive and the merger turns each group of 4 into one LLM token. There is no
  CLS token. Attention runs per segment of ``cu_seqlens`` (one per image and per temporal patch
  of a video; Qwen2.5-VL: per window, except in ``fullatt_block_indexes``).
* Scores: the block's ``qkv`` output plus its rotary (cos, sin) and ``cu_seqlens`` are caught by
  hooks; attention received is reduced per segment (mean over heads and query rows, then mean
  over the 4 patches of a merged token), keys are head-means averaged the same way.
* Qwen2.5-VL runs its blocks and merger in window order and un-permutes after the merger with
  ``argsort(window_index)``: we recompute the same ``window_index`` from ``grid_thw`` (the
  model's own ``get_vision_window_index``) and map rows through it.
* Selection happens on the merger output (LLM-space tokens, raster order per image). A video is
  one budget split evenly over its temporal groups (one unit of h/2 x w/2 tokens each).
* Placeholders ``image_token_id`` / ``video_token_id``; counts per image from ``*_grid_thw``.
  M-RoPE positions [3|4, B, L] are sliced like everything else (kept tokens keep their original
  positions); decode positions the model derives from ``rope_deltas`` and the shorter cache are
  corrected by the engine.
* Qwen3-VL DeepStack: ``visual_pos_masks`` and the ``deepstack_visual_embeds`` rows are sliced
  with the same kept set; inner-LLM strategies must start at a layer >= the number of DeepStack
  levels (those layers add visual features at the visual positions).
"""
from __future__ import annotations

import importlib
from functools import partial
from typing import Any

import torch
from torch import nn

from tokenprune.attention import segment_reductions
from tokenprune.errors import UnsupportedCallError, UnsupportedModelError
from tokenprune.family import Family, ImageLayout, ScratchFn, StoreFn, Unit
from tokenprune.registry import register_family
from tokenprune.sequence import take
from tokenprune.stats import LayerDims
from tokenprune.strategies.base import LLMInfo, VisionInfo

from .llava import DecoderLLM

#: HiPrune's Qwen2.5-VL object layer (1-based) for a 32-block tower
PAPER_OBJECT_LAYER, PAPER_DEPTH = 16, 32


def object_layer(depth: int, full_blocks: list[int] | None = None) -> int:
    """1-based default object layer (HiPrune): the paper's 16 of 32, scaled to the depth; for a
    window-attention tower (Qwen2.5-VL) the full-attention block nearest to it (block 15, 0-based,
    in the real model), since windowed blocks only see their window."""
    if not full_blocks:
        return max(1, round(PAPER_OBJECT_LAYER * depth / PAPER_DEPTH))
    target = PAPER_OBJECT_LAYER * depth / PAPER_DEPTH - 1
    return min(full_blocks, key=lambda i: (abs(i - target), i)) + 1


@register_family
class QwenVLFamily(DecoderLLM, Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    pixel_keys = {"image": "pixel_values", "video": "pixel_values_videos"}
    select_on_output = True
    #: module holding ``apply_rotary_pos_emb_vision`` for this family
    modeling = "transformers.models.qwen2_vl.modeling_qwen2_vl"
    windowed = False
    #: M-RoPE gives an image of h x w tokens max(h, w) positions whatever is kept: there is no
    #: run of consecutive positions to close, so renumbering is refused rather than invented
    supports_compact = False

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        core = getattr(model, "model", model)
        for attr in ("visual", "language_model"):
            if not hasattr(core, attr):
                raise UnsupportedModelError(
                    f"{type(model).__name__} (model_type {model.config.model_type!r}) has no {attr}; "
                    f"expected the transformers 5.x {self.name} layout")
        cfg = model.config
        self.outer = core
        self.vision_tower = core.visual
        self.projector = core.visual.merger
        self.language_model = core.language_model
        self.decoder_layers = core.language_model.layers
        self._blocks = core.visual.blocks
        vcfg = cfg.vision_config
        self.merge = int(vcfg.spatial_merge_size)
        depth = len(self._blocks)
        self.vision_info = VisionInfo(num_layers=depth, feature_layer=depth - 1, grid=(0, 0), has_cls=False,
                                      object_layer=self._object_layer(depth))
        self.llm_info = LLMInfo(num_layers=len(self.decoder_layers))
        self.num_prefix = 0
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        self.provides = frozenset({"features", "mean_attention", "keys", "llm_attention", "video"})
        self._rotary_vision = importlib.import_module(self.modeling).apply_rotary_pos_emb_vision

    def _object_layer(self, depth: int) -> int:
        return object_layer(depth)

    @property
    def tokens_per_image(self) -> int | None:
        return None

    # --- vision ------------------------------------------------------------------------------
    def install_vision_capture(self, layer: int, kinds: set[str], store: StoreFn,
                               scratch: ScratchFn) -> list[Any]:
        attn = self._blocks[layer].attn
        # partials of methods (not closures), so a deep copy of the model binds to the copies
        return [attn.register_forward_pre_hook(partial(self._vision_pre, layer, scratch), with_kwargs=True),
                attn.qkv.register_forward_hook(partial(self._vision_grab, layer, scratch)),
                attn.register_forward_hook(partial(self._vision_done, layer, frozenset(kinds), store, scratch))]

    @staticmethod
    def _vision_pre(layer: int, scratch: ScratchFn, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        box = scratch()
        if box is not None:
            box[(layer, "rope")] = kwargs.get("position_embeddings")
            box[(layer, "cu")] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)

    @staticmethod
    def _vision_grab(layer: int, scratch: ScratchFn, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        box = scratch()
        if box is not None:
            box[(layer, "qkv")] = output

    def _vision_done(self, layer: int, kinds: frozenset[str], store: StoreFn, scratch: ScratchFn,
                     module: nn.Module, args: tuple, output: Any) -> None:
        box = scratch()
        if box is None or (layer, "qkv") not in box:
            return
        attn = self._blocks[layer].attn
        qkv, rope, cu = box.pop((layer, "qkv")), box.pop((layer, "rope")), box.pop((layer, "cu"))
        store(layer, lambda: self._reduce(qkv, rope, cu, attn.num_heads, attn.scaling, set(kinds)))

    def vision_capture_modules(self, layer: int) -> list[nn.Module]:
        attn = self._blocks[layer].attn
        return [attn, attn.qkv]

    def _reduce(self, qkv: torch.Tensor, rope: Any, cu: torch.Tensor, heads: int, scale: float,
                kinds: set[str]) -> dict[str, torch.Tensor]:
        """Per-patch reductions [S] / [S, d] of one block, segment by segment (as its attention)."""
        s = qkv.shape[0]
        q, k, _ = qkv.reshape(s, 3, heads, -1).unbind(1)          # [S, H, d]
        if rope is not None:
            q, k = self._rotary_vision(q, k, rope[0], rope[1])
        return segment_reductions(q.reshape(s, -1), k.reshape(s, -1), cu.tolist(), heads, scale, kinds)

    def vision_begin(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise UnsupportedCallError("the vision tower was called without grid_thw")
        order = None
        if self.windowed:
            from transformers.vision_utils import get_vision_window_index

            v = self.vision_tower
            window_index, _ = get_vision_window_index(grid, spatial_merge_size=v.spatial_merge_size,
                                                      window_size=v.window_size, patch_size=v.patch_size)
            order = torch.argsort(window_index)   # raster token r sits at merger row order[r]
        # host syncs (2 per vision pass): the image sizes, as the model itself reads them to lay
        # its patches out; a window-attention tower's order map is computed from them on the host
        return {"grid": [tuple(int(x) for x in row) for row in grid.tolist()], "order": order}

    def vision_layout(self, x: torch.Tensor, scores: dict[tuple[int, str], torch.Tensor],
                      meta: Any, per_frame: bool = True) -> tuple[torch.Tensor, list[ImageLayout]]:
        m2 = self.merge * self.merge
        order = meta["order"]
        n_total = x.shape[0]
        base = torch.arange(n_total, device=x.device) if order is None else order.to(x.device)
        # patch scores -> merged-token scores (4 consecutive patches = 1 token, merger row order)
        tok_scores = {key: v.reshape(n_total, m2, *v.shape[1:]).mean(1) for key, v in scores.items()}
        layouts, off = [], 0
        for t, h, w in meta["grid"]:
            gh, gw = h // self.merge, w // self.merge
            units = []
            for _ in range(t if per_frame else 1):
                n = gh * gw * (1 if per_frame else t)
                rows = base[off:off + n]
                sc = {key: v[rows.to(v.device)] for key, v in tok_scores.items()}
                units.append(Unit(rows=rows, grid=(gh, gw), scores=sc, frames=1 if per_frame else t))
                off += n
            layouts.append(ImageLayout(prefix=0, units=units))
        return x, layouts

    def vision_restore(self, flat: torch.Tensor, x: torch.Tensor, meta: Any) -> torch.Tensor:
        return flat

    def image_outputs(self, output: torch.Tensor, layouts: list[ImageLayout], meta: Any) -> list[torch.Tensor]:
        outs, off = [], 0
        for lay in layouts:
            n = lay.n_tokens
            if meta["order"] is None:
                outs.append(output[off:off + n])          # views: the model's own split shares storage
            else:
                outs.append(output[torch.cat([u.rows for u in lay.units]).to(output.device)])
            off += n
        return outs

    # --- LLM input -----------------------------------------------------------------------------
    def _counts(self, grid: Any) -> list[int]:
        """Placeholder tokens per image / video (one host sync: the sizes are data, not shapes)."""
        m2 = self.merge * self.merge
        return [int(t * h * w) // m2 for t, h, w in grid.tolist()]

    def placeholder_counts(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, list[int]] | None:
        out: dict[str, list[int]] = {}
        given = kwargs.get("mm_encoder_outputs") or {}
        for m, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            if kwargs.get(key) is not None:
                out[m] = self._counts(kwargs[key])
            elif given.get(m) is not None:
                out[m] = [int(f.shape[0]) for f in given[m].pooler_output]
        return out

    def placeholder_masks(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        masks = {m: self.token_mask(args, kwargs, tid)
                 for m, tid in (("image", self.image_token_id), ("video", self.video_token_id))}
        return {m: v for m, v in masks.items() if v is not None}

    def vision_segments(self, args: tuple, kwargs: dict[str, Any], counts: dict[str, list[int]]) -> list[int]:
        segs: list[int] = []
        for key in ("image_grid_thw", "video_grid_thw"):
            if kwargs.get(key) is not None:
                for t, h, w in kwargs[key].tolist():
                    segs.extend([int(h * w)] * int(t))
        return segs

    def bench_inputs(self, batch: int, text_tokens: int, size: tuple[int, int] | None = None,
                     video_frames: int | None = None) -> dict[str, torch.Tensor]:
        """One image of ``size`` = (h, w) patches per row, flat patches + ``image_grid_thw``, the
        prompt padded to ``text_tokens`` text tokens; the config's own special ids."""
        from tokenprune.eval.tiny import QWEN_IDS, qwen_batch, qwen_inputs, qwen_prompt

        if video_frames or size is None:
            raise NotImplementedError("the Qwen bench rows are one image of a given size (h, w) in patches")
        cfg = self.model.config
        one = qwen_inputs(self.name, images=[size], seed=1)
        n_img = size[0] * size[1] // 4
        ids = qwen_prompt([("image", n_img)], vocab=min(cfg.text_config.vocab_size, 1024))
        pad = text_tokens - (ids.shape[1] - n_img)
        ids = torch.cat([ids[:, :1], torch.randint(10, 1000, (1, max(0, pad))), ids[:, 1:]], 1)
        one["input_ids"], one["attention_mask"] = ids, torch.ones_like(ids)
        inp = qwen_batch(self.name, [one] * batch)
        real = inp["input_ids"].clone()        # the tiny builder's special ids -> the config's
        for key, attr in (("image", "image_token_id"), ("video", "video_token_id"),
                          ("vision_start", "vision_start_token_id"), ("vision_end", "vision_end_token_id")):
            real[inp["input_ids"] == QWEN_IDS[key]] = int(getattr(cfg, attr))
        inp["input_ids"] = real
        return inp

    def image_overlay(self, image: Any, kept: torch.Tensor | None, merge_groups: torch.Tensor | None,
                      processor: Any, inputs: dict[str, Any]) -> Any:
        """Merged 2 x 2 patch cells over the resized image (its size from ``image_grid_thw``)."""
        from tokenprune.visualize import merged_patch_boxes, overlay

        _, gh, gw = (int(x) for x in inputs["image_grid_thw"][0].tolist())
        ip = processor.image_processor
        patch, merge = int(ip.patch_size), int(ip.merge_size)
        boxes = merged_patch_boxes(image.size, (gh * patch, gw * patch), patch, merge)
        if kept is None:
            return overlay(image, torch.arange(boxes.shape[0]), boxes, outline=False)
        return overlay(image, kept, boxes, merge_groups)

    def video_overlay(self, frames: list[Any], kept: torch.Tensor | None, n_tokens: int, processor: Any,
                      inputs: dict[str, Any]) -> Any:
        """Merged cells per temporal patch (each covers ``temporal_patch_size`` frames)."""
        from tokenprune.visualize import merged_patch_boxes, video_overlay

        _, gh, gw = (int(x) for x in inputs["video_grid_thw"][0].tolist())
        vp = processor.video_processor
        patch, merge = int(vp.patch_size), int(vp.merge_size)
        per_frame, step = (gh // merge) * (gw // merge), int(getattr(vp, "temporal_patch_size", 2))
        boxes = merged_patch_boxes(frames[0].size, (gh * patch, gw * patch), patch, merge)
        kept = torch.arange(n_tokens) if kept is None else kept
        return video_overlay(frames[: (n_tokens // per_frame) * step], kept, per_frame, boxes, step)

    def vision_dims(self) -> tuple[LayerDims, int, int]:
        v = self.model.config.vision_config
        e = getattr(v, "embed_dim", None) or v.hidden_size
        mlp = getattr(v, "intermediate_size", None) or int(e * getattr(v, "mlp_ratio", 4))
        dims = LayerDims(hidden=e, q_dim=e, kv_dim=e, mlp=mlp, gated=self.name == "qwen2_5_vl")
        return dims, self.vision_info.num_layers, 0


@register_family
class Qwen25VLFamily(QwenVLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    modeling = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
    windowed = True

    def _object_layer(self, depth: int) -> int:
        return object_layer(depth, list(getattr(self.model.model.visual, "fullatt_block_indexes", []) or []))


@register_family
class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    modeling = "transformers.models.qwen3_vl.modeling_qwen3_vl"

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.min_inner_layer = max(1, len(getattr(self.vision_tower, "deepstack_visual_indexes", []) or []))
        self.llm_info = LLMInfo(num_layers=len(self.decoder_layers), min_layer=self.min_inner_layer)

    def video_processor_kwargs(self, video: Any) -> dict[str, Any]:
        """Its processor places timestamps between frames: it needs the sampling rate."""
        return {"videos_kwargs": {"video_metadata": [{"fps": 2.0, "total_num_frames": int(video.shape[0])}]}}

    def prune_lm_kwargs(self, new: dict[str, Any], kwargs: dict[str, Any], keep: torch.Tensor,
                        idx: torch.Tensor) -> None:
        vpm = kwargs.get("visual_pos_masks")
        if vpm is None:
            return
        vpm = vpm.to(keep.device)
        rows = keep[vpm]                       # kept flags of visual tokens, (batch, seq) order
        new["visual_pos_masks"] = take(vpm, idx, 1, False)
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is not None:
            new["deepstack_visual_embeds"] = [e[rows.to(e.device)] for e in embeds]

