"""InternVL family: ``InternVLForConditionalGeneration`` (model_type ``internvl``, the transformers-native
``-hf`` checkpoints: InternVL2.5 / 3 / 3.5).

Knowledge held here:

* Dynamic tiling: the processor (``GotOcr2ImageProcessor`` with ``crop_to_patches``) cuts an image
  into a C x R grid of square tiles (raster order) and, when there are several, appends a thumbnail
  of the whole image; every tile is one sample of ``pixel_values`` [tiles, 3, S, S], the tiles of all
  images of a call one after another. Video frames are resized to one tile each and joined to the
  same ``pixel_values`` (``InternVLProcessor`` merges them in prompt order): to the model a frame is
  a one-tile image with its own ``<img>`` ... ``</img>`` run, so it is pruned as one (there is no
  video modality the model could tell apart; video-only methods are refused).
* The tower (InternViT, ``model.model.vision_tower.encoder.layer``) has a CLS token at position 0;
  ``vision_feature_select_strategy="default"`` drops it (``"full"`` would make the model's own square
  reshape fail, so it is refused). Scores come from the hooked q/k of the needed layers — read after
  ``q_norm`` / ``k_norm`` (QK-norm towers; an identity otherwise), as the attention uses them —
  per tile; CLS attention is offered.
* After the tower, ``pixel_shuffle`` (``downsample_ratio`` 0.5) folds every 2 x 2 block of the
  G x G patch grid into one token ((G/2)^2 per tile, raster order), then the projector maps to LLM
  width and the model scatters every tile's tokens into the ``<IMG_CONTEXT>`` placeholders in order.
  Score maps are pooled the same way: run through the model's own ``pixel_shuffle`` (so the grouping
  is the features'), then the mean over each group of 4 (keys: per channel).
* The model gets no per-image tile counts, only the placeholder runs (one per image / frame, between
  ``<img>`` and ``</img>``): an image's tiles = its run length / tokens per tile. Selection therefore
  happens at the LLM input (``select_at_lm``) on the projector output there (LLM-space tokens): each
  run is matched to the next tiles of the encoder pass (its embeddings are those rows exactly;
  ``generate``'s copies of a prompt for beams reuse the tiles they equal) and laid out as one
  :class:`~tokenprune.family.Unit` per tile, the image's budget split evenly over its tiles (the
  thumbnail counts as one tile), as LLaVA-NeXT's per crop.
* The LLM is a Llama-style decoder (Qwen2 / Qwen3 / Llama): rotary ``rotate_half``, 1-D positions.
"""
from __future__ import annotations

from typing import Any

import torch

from tokenprune.errors import UnsupportedCallError, UnsupportedModelError
from tokenprune.family import Family, ImageLayout, Unit, VisionAttention
from tokenprune.registry import register_family
from tokenprune.sequence import run_lengths
from tokenprune.stats import LayerDims
from tokenprune.strategies.base import LLMInfo, VisionInfo

from .llava import ROTARY_LLMS, DecoderLLM, llava_core

#: the image processor's default tile range when its own is unknown (``GotOcr2ImageProcessor``)
DEFAULT_TILES = (1, 12)


def _pair(x: Any) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


def tile_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the tile grid the image processor picks for an image of ``height`` x
    ``width`` px (its own ``get_optimal_tiled_canvas``)."""
    try:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    except ImportError:                         # transformers versions without the PIL backend module
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
    cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), min_tiles, max_tiles)
    return int(cols), int(rows)


@register_family
class InternVLFamily(DecoderLLM, Family):
    name = "internvl"
    model_types = ("internvl",)
    select_at_lm = True
    video_frames_as_images = True    # the processor's frames reach the model as one-tile images

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        core = llava_core(self, model, "internvl", "InternVLForConditionalGeneration")
        cfg = model.config
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        layers = getattr(getattr(core.vision_tower, "encoder", None), "layer", None)
        if layers is None:
            raise UnsupportedModelError(f"cannot find the encoder layers of vision tower {type(core.vision_tower).__name__}")
        self._layers = layers
        n_layers = len(layers)
        vfl = cfg.vision_feature_layer
        if isinstance(vfl, (list, tuple)):
            raise UnsupportedModelError(f"InternVL reads one vision feature layer; got vision_feature_layer={vfl}")
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} keeps the CLS token, so "
                "the features are not a square grid to pixel-shuffle (the model itself cannot run it)")
        feature_layer = n_layers - 1 if int(vfl) == -1 else int(vfl) % (n_layers + 1) - 1
        ratio = float(cfg.downsample_ratio)
        group = round(1 / ratio)
        (ih, iw), (ph, pw) = _pair(vcfg.image_size), _pair(vcfg.patch_size)
        side = ih // ph
        if abs(group * ratio - 1) > 1e-6 or ih != iw or ph != pw or side % group:
            raise UnsupportedModelError(
                f"tiles of {ih} x {iw} px in patches of {ph} x {pw} px cannot be pixel-shuffled by {ratio}")
        self.ratio, self.group = ratio, group
        self.tile_px = ih
        self.side = side                     #: patches a side of one tile
        self.tile_side = side // group       #: LLM tokens a side of one tile
        self.tile_tokens = self.tile_side ** 2
        self.num_prefix = 0
        self.vision_info = VisionInfo(num_layers=n_layers, feature_layer=feature_layer,
                                      grid=(self.tile_side, self.tile_side), has_cls=True)
        self.llm_info = LLMInfo(num_layers=len(self.decoder_layers))
        self.image_token_id = int(cfg.image_token_id)
        provides = {"features", "llm_attention"} if tcfg.model_type in ROTARY_LLMS else {"features"}
        if feature_layer >= 0:
            provides |= {"mean_attention", "keys", "cls_attention"}
        self.provides = frozenset(provides)

    @property
    def tokens_per_image(self) -> int | None:
        return None

    # --- vision ------------------------------------------------------------------------------
    def vision_attention(self, layer: int) -> VisionAttention:
        attn = self._layers[layer].attention
        # q/k after the (optional) QK norms, before the head split: what the kernel gets
        return VisionAttention(module=attn, q_source=attn.q_norm, k_source=attn.k_norm,
                               num_heads=attn.num_heads, scale=attn.scale)

    def vision_dims(self) -> tuple[LayerDims, int, int]:
        v = self.model.config.vision_config
        dims = LayerDims(hidden=v.hidden_size, q_dim=v.hidden_size, kv_dim=v.hidden_size,
                         mlp=v.intermediate_size, gated=False)
        return dims, self.vision_info.num_layers, self.side * self.side + 1

    def vision_segments(self, args: tuple, kwargs: dict[str, Any], counts: dict[str, list[int]]) -> list[int]:
        px = kwargs.get("pixel_values")
        tiles = int(px.shape[0]) if px is not None else sum(counts.get("image", [])) // self.tile_tokens
        return [self.side * self.side + 1] * tiles

    def pool_scores(self, v: torch.Tensor) -> torch.Tensor:
        """Per-patch scores of tiles [n, G*G] (or keys [n, G*G, d]), CLS removed -> per LLM token
        [n, T] ([n, T, d]): the model's own ``pixel_shuffle`` groups the patches as it groups the
        features, then each group of ``group^2`` patches is averaged."""
        n = v.shape[0]
        x = v.float().reshape(n, self.side, self.side, -1)
        d = x.shape[-1]
        y = self.outer.pixel_shuffle(x, scale_factor=self.ratio)              # [n, G/g, G/g, g*g*d]
        y = y.reshape(n, self.tile_tokens, self.group * self.group, d).mean(2)
        return y[..., 0] if v.dim() == 2 else y

    # --- LLM input -----------------------------------------------------------------------------
    def placeholder_counts(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, list[int]] | None:
        """One contiguous run of ``<IMG_CONTEXT>`` per image / frame (``<img>`` ... ``</img>``), in order."""
        mask = self.visual_mask(args, kwargs)
        if mask is None:
            return {}
        return {"image": run_lengths(mask)}

    def lm_layouts(self, modality: str, spans: list[Any], embeds: torch.Tensor, raws: list[Any],
                   per_frame: bool = True) -> list[ImageLayout]:
        if modality != "image":
            raise UnsupportedCallError(f"{self.name} has no {modality} input")
        feats = torch.cat([r[1] for r in raws])                           # [tiles, T, D] projector output
        n_feats, t = feats.shape[0], self.tile_tokens
        # drop the CLS column, pool to the pixel-shuffled tokens
        scores = {k: self.pool_scores(torch.cat([r[0][k] for r in raws])[:, 1:]) for k in raws[0][0]}
        length = embeds.shape[1]
        out: list[ImageLayout] = []
        starts: list[tuple[int, int]] = []          # (first tile, tiles) of the runs laid out so far
        cursor = 0
        for sp in spans:
            cols = sp.cols.to(embeds.device)
            n = cols.numel()
            if n % t:
                raise UnsupportedCallError(
                    f"an image placeholder run of {n} tokens is not a whole number of tiles of {t} tokens")
            tiles = n // t
            run = embeds[sp.row, cols]

            def same(a: int, tiles: int = tiles, run: torch.Tensor = run) -> bool:
                rows = feats[a:a + tiles].reshape(tiles * t, -1).to(run.device, run.dtype)
                return torch.equal(rows, run)
            if cursor + tiles <= n_feats and same(cursor):
                start = cursor
                cursor += tiles
            else:                  # generate's copy of an earlier prompt (beams): the tiles it equals
                start = next((a for a, k in starts if k == tiles and same(a)), -1)
                if start < 0:
                    raise UnsupportedCallError(
                        f"an image placeholder run of {tiles} tile(s) does not hold the next tiles of the encoder "
                        f"pass ({n_feats} tiles, {cursor} used)")
            starts.append((start, tiles))
            flat = sp.row * length + cols
            units = [Unit(rows=flat[j * t:(j + 1) * t], grid=(self.tile_side, self.tile_side),
                          span_pos=torch.arange(j * t, (j + 1) * t),
                          scores={k: v[start + j] for k, v in scores.items()}) for j in range(tiles)]
            out.append(ImageLayout(prefix=0, units=units))
        if cursor != n_feats:
            raise UnsupportedCallError(f"{n_feats} encoded tiles, the placeholders account for {cursor}")
        return out

    # --- benchmark inputs & presentation -------------------------------------------------------
    def tiles_for(self, height: int, width: int, tiles: tuple[int, int] = DEFAULT_TILES) -> tuple[int, int, int]:
        """(columns, rows, tiles incl. the thumbnail) the image processor gives an image of
        ``height`` x ``width`` px with ``tiles`` = (min, max) tiles."""
        cols, rows = tile_grid(height, width, self.tile_px, *tiles)
        return cols, rows, cols * rows + (1 if cols * rows > 1 else 0)

    def bench_inputs(self, batch: int, text_tokens: int, size: tuple[int, int] | None = None,
                     video_frames: int | None = None) -> dict[str, torch.Tensor]:
        """One image of ``size`` = (h, w) px per row: its tiles (the processor's default 1..12 tile
        grid, plus the thumbnail) and one placeholder run of tiles x tokens per tile."""
        from tokenprune.eval.tiny import placeholder_batch

        if video_frames:
            raise NotImplementedError(f"{self.name} feeds video frames as one-tile images; bench images instead")
        if size is None:
            raise NotImplementedError("the InternVL bench rows are one image of a given size (h, w) in px")
        _, _, tiles = self.tiles_for(int(size[0]), int(size[1]))
        cfg = self.model.config
        s = self.tile_px
        out = placeholder_batch(tiles * self.tile_tokens, self.image_token_id, batch, text_tokens,
                                cfg.text_config.vocab_size, (tiles, 3, s, s), "pixel_values")
        out["pixel_values"] = out["pixel_values"].reshape(batch * tiles, 3, s, s)
        return out

    def image_overlay(self, image: Any, kept: torch.Tensor | None, merge_groups: torch.Tensor | None,
                      processor: Any, inputs: dict[str, Any]) -> Any:
        """The first image's tiles as one canvas over the image (the processor squashes the image onto
        the C x R tile grid), and the thumbnail's grid as a second panel; a one-tile image: its grid."""
        from tokenprune.visualize import grid, overlay, uniform_boxes

        ids = inputs.get("input_ids")
        counts = (self.placeholder_counts((), {"input_ids": ids.cpu()}) or {}).get("image") if ids is not None else None
        n = counts[0] if counts else self.tile_tokens
        tiles, ts, t = n // self.tile_tokens, self.tile_side, self.tile_tokens
        kept = torch.arange(n) if kept is None else torch.as_tensor(kept).long()
        ip = getattr(processor, "image_processor", None)
        lo, hi = int(getattr(ip, "min_patches", DEFAULT_TILES[0])), int(getattr(ip, "max_patches", DEFAULT_TILES[1]))
        cols, rows, expect = self.tiles_for(image.size[1], image.size[0], (lo, hi))
        if tiles == 1 or expect != tiles:        # one tile (or a tiling we cannot name): the first tile's grid
            first = kept[kept < t]
            return overlay(image, first, uniform_boxes(image.size, ts, ts),
                           None if merge_groups is None else merge_groups[:t])
        n_grid = cols * rows * t
        pos = torch.arange(n_grid)
        tile, local = pos // t, pos % t
        canvas = ((tile // cols) * ts + local // ts) * (cols * ts) + (tile % cols) * ts + local % ts
        grid_kept = canvas[kept[kept < n_grid]]
        groups = None
        if merge_groups is not None:
            groups = torch.empty(n_grid, dtype=torch.long)
            groups[canvas] = torch.as_tensor(merge_groups)[:n_grid].long()
        panels = [overlay(image, grid_kept, uniform_boxes(image.size, rows * ts, cols * ts), groups),
                  overlay(image, kept[kept >= n_grid] - n_grid, uniform_boxes(image.size, ts, ts),
                          None if merge_groups is None else merge_groups[n_grid:])]
        titles = [f"tiles ({rows}x{cols} of {ts}x{ts})", f"thumbnail ({ts}x{ts})"]
        return grid(panels, titles, cols=2, cell=max(256, max(image.size)))

    def video_overlay(self, frames: list[Any], kept: torch.Tensor | None, n_tokens: int, processor: Any,
                      inputs: dict[str, Any]) -> Any:
        """Every frame's tile grid (a frame is one tile of ``tile_side`` x ``tile_side`` tokens, in clip
        order); ``kept``: indices into the clip's frame-major tokens."""
        from tokenprune.visualize import uniform_boxes, video_overlay

        t = self.tile_tokens
        n_frames = n_tokens // t
        if n_frames != len(frames):       # a processor that sampled frames: spread them over the clip
            frames = [frames[round(i * (len(frames) - 1) / max(1, n_frames - 1))] for i in range(n_frames)]
        kept = torch.arange(n_tokens) if kept is None else torch.as_tensor(kept).long()
        boxes = uniform_boxes(frames[0].size, self.tile_side, self.tile_side)
        return video_overlay(frames, kept, t, boxes, 1)
