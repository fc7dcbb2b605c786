"""LLaVA-NeXT (``llava_next``) and LLaVA-OneVision (``llava_onevision``) families.

Knowledge held here:

* The tower (CLIP for NeXT, SigLIP without CLS for OneVision) encodes every crop of every image
  of a call as one batch; scores come from the hooked q/k of the needed layers, per crop, as for
  LLaVA-1.5 (:class:`patches.llava.LlavaFamily`, which this extends).
* The placeholder layout is built *after* the projector by ``pack_image_features``: the base crop
  (G x G tokens, G = image_size / patch_size) first, then the high-resolution crops stitched into one
  canvas, unpadded to the image's aspect ratio (OneVision: bilinearly downsampled when it exceeds
  ``anyres_max_9``), with an ``image_newline`` token after every canvas row (one after the base crop
  when there is no canvas: OneVision multi-image). Videos (OneVision): each frame's G x G grid
  pooled 2x bilinearly, frames concatenated, one newline after the video.
* So selection happens at the LLM input (``select_at_lm``): for each placeholder run we recover
  that geometry from the run itself (newline tokens are exactly the ``image_newline`` vector), pick
  the crop grid among the configured pinpoints whose unpadding (and downsampling) gives it, confirm
  it by rebuilding the run from the crops' projector outputs, and map the per-crop score maps the
  same way (the model's own ops: view/permute, centre unpadding, bilinear resize, ``apply_pooling``).
  This needs no ``image_sizes``, which ``generate`` (transformers >= 5.24) does not pass on after it
  pre-encodes images.
* Units and budget: the base crop (G x G) and the canvas (rows x cols, newlines excluded) are the
  image's units; the image's budget (``keep`` of its content tokens, newlines not counted) is split
  by crops covered — the base 1, the canvas the number of high-resolution crops — as the papers'
  even split per crop. Newline tokens are structure: always kept, never counted. Video: per frame
  (image strategies) or the whole video (HoliTom), one budget per video.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenprune.errors import UnsupportedCallError, UnsupportedModelError
from tokenprune.family import ImageLayout, Unit
from tokenprune.registry import register_family
from tokenprune.sequence import run_lengths

from .llava import LlavaFamily


@register_family
class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    model_types = ("llava_next",)
    select_at_lm = True
    #: OneVision downsamples canvases larger than this many crops (``anyres_max_9``)
    max_crops: int | None = None

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        if self.num_prefix:
            raise UnsupportedModelError(
                f"{type(model).__name__} with vision_feature_select_strategy='full' on a CLS tower keeps CLS in "
                "every crop; the packed anyres layout is not defined for it")
        cfg = model.config
        self.crop_px = int(cfg.vision_config.image_size)
        self.side = self.crop_px // int(cfg.vision_config.patch_size)
        self.pinpoints = [tuple(int(x) for x in p) for p in cfg.image_grid_pinpoints]
        self.vision_info = type(self.vision_info)(
            num_layers=self.vision_info.num_layers, feature_layer=self.vision_info.feature_layer,
            grid=(0, 0), has_cls=self.vision_info.has_cls)

    @property
    def tokens_per_image(self) -> int | None:
        return None

    @property
    def newline(self) -> torch.Tensor:
        """The ``image_newline`` vector, read at each use: accelerate's offloading swaps the
        parameter object in and out around the model's forward."""
        return self.outer.image_newline

    def placeholder_counts(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, list[int]] | None:
        """Runs are cut where the layout says: every image run ends with a newline token."""
        ids = self.input_ids(args, kwargs)
        masks = self.placeholder_masks(args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        out: dict[str, list[int]] = {}
        for m, mask in masks.items():
            out[m] = self._run_lengths(m, mask, ids, embeds, kwargs)
        return out

    def _image_counts(self, kwargs: dict[str, Any]) -> list[int] | None:
        """Placeholders per image from ``image_sizes`` with the model's own packing (run on
        1-channel zeros): exact, also for images whose runs touch."""
        flags = self.newline_flags(kwargs)
        return None if flags is None else [int(f.numel()) for f in flags]

    def run_layout(self, kwargs: dict[str, Any]) -> list[tuple[int, int, int]]:
        """(base side, canvas rows, canvas cols) of every image of a processor output."""
        out = []
        for f in self.newline_flags(kwargs) or []:
            g2 = self.side * self.side
            rows = int(f[g2:].sum()) if f.numel() > g2 + 1 else 0
            cols = (f.numel() - g2 - rows) // rows if rows else 0
            out.append((self.side, rows, cols))
        return out

    def newline_flags(self, kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
        """Per image, True at the newline positions of its placeholder run (the model's own
        packing of 1-channel zeros with a newline of one)."""
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            return None
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        bn = kwargs.get("batch_num_images")
        n_img = [] if bn is None else [int(x) for x in bn]
        patching = [n == 1 for n in n_img for _ in range(int(n))] if n_img else [True] * len(sizes)
        crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=self.model.config.image_grid_pinpoints,
                                           patch_size=self.crop_px) if p else 1 for s, p in zip(sizes, patching)]
        g2 = self.side * self.side
        dummies = [torch.zeros(c, g2, 1) for c in crops]
        newline = torch.ones(1)
        if self.max_crops is None:
            packed, _ = self.outer.pack_image_features(dummies, sizes, "default", image_newline=newline)
        else:
            packed, _ = self.outer.pack_image_features(dummies, sizes, image_newline=newline,
                                                       vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return [p[:, 0] > 0.5 for p in packed]

    def _run_lengths(self, m: str, mask: torch.Tensor, ids: Any, embeds: Any, kwargs: dict[str, Any]) -> list[int]:
        """Placeholder tokens of each image / video, in order: from ``image_sizes`` when the call
        has them, else from the encoder outputs given (``generate`` in transformers >= 5.24), else
        contiguous placeholder runs."""
        if m == "image":
            counts = self._image_counts(kwargs)
            if counts is not None:
                return counts
        # where the runs of an anyres prompt end depends on each image's size and unpadding,
        # read from the placeholders themselves
        lengths = run_lengths(mask)
        given = (kwargs.get("mm_encoder_outputs") or {}).get(m)
        if given is not None:
            sizes = [int(f.shape[0]) for f in (given.pooler_output if not torch.is_tensor(given.pooler_output)
                                                else list(given.pooler_output))]
            if sum(sizes) == sum(lengths):
                return sizes
        return lengths

    def vision_segments(self, args: tuple, kwargs: dict[str, Any], counts: dict[str, list[int]]) -> list[int]:
        g = self.side * self.side + (1 if self.vision_info.has_cls else 0)
        n = 0
        for key in ("pixel_values", "pixel_values_videos"):
            px = kwargs.get(key)
            if px is not None:
                n += px.shape[0] * (px.shape[1] if px.dim() == 5 else 1)
        return [g] * n

    # --- geometry --------------------------------------------------------------------------------
    def _candidates(self, n_crops_left: int) -> list[tuple[int, int]]:
        out = []
        for ph, pw in self.pinpoints:
            gh, gw = ph // self.crop_px, pw // self.crop_px
            if (gh, gw) not in out and 1 + gh * gw <= n_crops_left:
                out.append((gh, gw))
        return out

    def _final(self, r0: int, c0: int) -> tuple[int, int]:
        if self.max_crops is None:
            return r0, c0
        ratio = math.sqrt(r0 * c0 / (self.max_crops * self.side ** 2))
        if ratio > 1.1:
            return int(r0 // ratio), int(c0 // ratio)
        return r0, c0

    def _canvas(self, crops: torch.Tensor, gh: int, gw: int, r0: int, c0: int) -> torch.Tensor:
        """[gh*gw, G*G, C] crop maps -> [C, rows, cols] as the model packs them (stitch, centre
        unpadding, OneVision's bilinear downsampling)."""
        g = self.side
        x = crops.reshape(gh, gw, g, g, -1).permute(4, 0, 2, 1, 3).reshape(-1, gh * g, gw * g)
        h0, w0 = gh * g, gw * g
        top, left = (h0 - r0) // 2, (w0 - c0) // 2
        x = x[:, top:top + r0, left:left + c0]
        rf, cf = self._final(r0, c0)
        if (rf, cf) != (r0, c0):
            x = nn.functional.interpolate(x[None], [rf, cf], mode="bilinear")[0]
        return x

    def _geometry(self, run: torch.Tensor, feats: torch.Tensor, rows: int, cols: int) -> tuple[int, int, int, int]:
        """(gh, gw, r0, c0) whose packed canvas is ``run`` [rows*cols, D] (newlines removed)."""
        base = self.side
        found = []
        for gh, gw in self._candidates(feats.shape[0]):
            h0, w0 = gh * base, gw * base
            shapes = {(h0, w0 - 2 * p) for p in range(0, w0 // 2 + 1)} | {(h0 - 2 * p, w0) for p in range(0, h0 // 2 + 1)}
            for r0, c0 in sorted(shapes, reverse=True):
                if r0 > 0 and c0 > 0 and self._final(r0, c0) == (rows, cols):
                    found.append((gh, gw, r0, c0))
        for gh, gw, r0, c0 in found:
            if 1 + gh * gw > feats.shape[0]:
                continue
            canvas = self._canvas(feats[1:1 + gh * gw].to(run.dtype), gh, gw, r0, c0)
            if torch.allclose(canvas.reshape(canvas.shape[0], -1).T, run, rtol=1e-3, atol=1e-4):
                return gh, gw, r0, c0
        raise UnsupportedCallError(
            f"cannot match a {rows} x {cols} packed image to the crops of its encoder pass "
            f"(pinpoints {self.pinpoints})")

    def _scores(self, scores: dict[tuple[int, str], torch.Tensor], lo: int, hi: int) -> dict:
        off = 1 if self.vision_info.has_cls else 0
        return {k: (v[lo:hi, off:] if v.dim() == 2 else v[lo:hi, off:, :]) for k, v in scores.items()}

    @staticmethod
    def _as_maps(s: torch.Tensor) -> torch.Tensor:
        return s[..., None] if s.dim() == 2 else s          # [n, N] -> [n, N, 1]; keys stay [n, N, d]

    def lm_layouts(self, modality: str, spans: list[Any], embeds: torch.Tensor, raws: list[Any],
                   per_frame: bool = True) -> list[ImageLayout]:
        scores = {k: torch.cat([r[0][k] for r in raws]) for k in raws[0][0]}
        feats = torch.cat([r[1] for r in raws])                          # [n_crops, G*G, D]
        length = embeds.shape[1]
        nl = self.newline.to(embeds.device, embeds.dtype)
        if modality == "video":
            return self._video_layouts(spans, embeds, scores, feats, per_frame)
        out, cursor, g2 = [], 0, self.side * self.side
        for sp in spans:
            if cursor >= feats.shape[0]:
                raise UnsupportedCallError(f"{feats.shape[0]} encoded crops for more image placeholder runs")
            cols = sp.cols.to(embeds.device)
            run = embeds[sp.row, cols]
            is_nl = (run == nl).all(-1)
            n = cols.numel()
            flat_rows = sp.row * length + cols
            base = Unit(rows=flat_rows[:g2], grid=(self.side, self.side), span_pos=torch.arange(g2),
                        scores={k: v[0] for k, v in self._scores(scores, cursor, cursor + 1).items()})
            rest_nl = is_nl[g2:]
            n_rows = int(rest_nl.sum())
            if n == g2 + 1 and bool(is_nl[-1]):                     # base crop only (+ newline)
                out.append(ImageLayout(prefix=0, units=[base], fixed=torch.tensor([g2]), length=n))
                cursor += 1
                continue
            n_cols = (n - g2 - n_rows) // max(n_rows, 1)
            if n_rows == 0 or n_rows * (n_cols + 1) != n - g2:
                raise UnsupportedCallError(f"an image placeholder run of {n} tokens does not have the packed "
                                           f"anyres layout (base {g2} + rows x (cols + newline))")
            content = torch.nonzero(~is_nl).flatten()
            canvas_pos = content[content >= g2]
            gh, gw, r0, c0 = self._geometry(run[canvas_pos], feats[cursor:], n_rows, n_cols)
            crop_scores = self._scores(scores, cursor + 1, cursor + 1 + gh * gw)
            sc = {k: self._canvas(self._as_maps(v).float(), gh, gw, r0, c0).reshape(self._as_maps(v).shape[-1], -1).T
                  for k, v in crop_scores.items()}
            sc = {k: (v[:, 0] if scores[k].dim() == 2 else v) for k, v in sc.items()}
            canvas = Unit(rows=flat_rows[canvas_pos], grid=(n_rows, n_cols), span_pos=canvas_pos.cpu(), scores=sc,
                          weight=float(gh * gw))
            fixed = torch.nonzero(is_nl).flatten().cpu()
            out.append(ImageLayout(prefix=0, units=[base, canvas], fixed=fixed, length=n))
            cursor += 1 + gh * gw
        if cursor != feats.shape[0]:
            raise UnsupportedCallError(f"{feats.shape[0]} encoded crops, the placeholders account for {cursor}")
        return out

    def structural(self, spans: list[Any], embeds: torch.Tensor) -> list[torch.Tensor]:
        nl = self.newline.to(embeds.device, embeds.dtype)
        return [torch.nonzero((embeds[sp.row, sp.cols.to(embeds.device)] == nl).all(-1)).flatten().cpu()
                for sp in spans]

    def _video_layouts(self, spans, embeds, scores, feats, per_frame):
        raise UnsupportedCallError(f"{self.name} has no video input")

    def bench_inputs(self, batch: int, text_tokens: int, size: tuple[int, int] | None = None,
                     video_frames: int | None = None) -> dict[str, torch.Tensor]:
        """One image of ``size`` = (h, w) px per row: its crops and ``image_sizes``; the placeholder
        count from the model's own packing."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        from tokenprune.eval.tiny import placeholder_batch

        if video_frames:
            return self._bench_video(batch, text_tokens, video_frames)
        if size is None:
            raise NotImplementedError("the anyres bench rows are one image of a given size (h, w) in px")
        cfg = self.model.config
        crops = image_size_to_num_patches(image_size=list(size), grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=self.crop_px)
        sizes = torch.tensor([list(size)] * batch)
        counts = self._image_counts({"image_sizes": sizes[:1]})
        assert counts is not None
        out = placeholder_batch(counts[0], self.image_token_id, batch, text_tokens, cfg.text_config.vocab_size,
                                (crops, 3, self.crop_px, self.crop_px), "pixel_values")
        return {**out, "image_sizes": sizes}

    def _bench_video(self, batch: int, text_tokens: int, frames: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} takes no video input")

    def image_overlay(self, image: Any, kept: torch.Tensor | None, merge_groups: torch.Tensor | None,
                      processor: Any, inputs: dict[str, Any]) -> Any:
        """Two panels: the base crop and the unpadded high-resolution canvas (with its rows)."""
        from tokenprune.visualize import anyres_overlay

        side, rows, cols = self.run_layout({k: v.cpu() for k, v in inputs.items()})[0]
        n = side * side + rows * (cols + 1) if rows else side * side + 1
        return anyres_overlay(image, torch.arange(n) if kept is None else kept, side, rows, cols, merge_groups)


@register_family
class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    pixel_keys = {"image": "pixel_values", "video": "pixel_values_videos"}

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        aspect = getattr(model.config, "vision_aspect_ratio", "anyres_max_9") or "anyres_max_9"
        self.max_crops = int(str(aspect).replace("anyres_max_", "")) if "max" in str(aspect) else None
        self.video_token_id = int(model.config.video_token_id)
        self.provides = self.provides | {"video"}

    def placeholder_masks(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = super().placeholder_masks(args, kwargs)
        video = self.token_mask(args, kwargs, self.video_token_id)
        if video is not None:
            out["video"] = video
        return out

    def _bench_video(self, batch: int, text_tokens: int, frames: int) -> dict[str, torch.Tensor]:
        """One clip of ``frames`` frames per row: pooled grids, one newline."""
        from tokenprune.eval.tiny import placeholder_batch

        cfg = self.model.config
        n = frames * math.ceil(self.side / 2) ** 2 + 1
        return placeholder_batch(n, self.video_token_id, batch, text_tokens, cfg.text_config.vocab_size,
                                 (frames, 3, self.crop_px, self.crop_px), "pixel_values_videos")

    def video_overlay(self, frames: list[Any], kept: torch.Tensor | None, n_tokens: int, processor: Any,
                      inputs: dict[str, Any]) -> Any:
        """The pooled grid of every frame (the newline token closing the run has no box)."""
        from tokenprune.visualize import uniform_boxes, video_overlay

        g = -(-self.side // 2)
        boxes = uniform_boxes(frames[0].size, g, g)
        kept = torch.arange(n_tokens) if kept is None else kept
        return video_overlay(frames[: n_tokens // (g * g)], kept, g * g, boxes, 1)

    def _video_layouts(self, spans, embeds, scores, feats, per_frame):
        """A video run: frames x (pooled g x g) tokens, then one newline."""
        length = embeds.shape[1]
        pooled = math.ceil(self.side / 2) ** 2
        pool = self.outer.apply_pooling
        maps = {k: pool(self._as_maps(v).float()) for k, v in self._scores(scores, 0, feats.shape[0]).items()}
        out, cursor = [], 0
        g = math.ceil(self.side / 2)
        for sp in spans:
            cols = sp.cols.to(embeds.device)
            n = cols.numel()
            frames = (n - 1) // pooled
            if frames * pooled + 1 != n:
                raise UnsupportedCallError(f"a video placeholder run of {n} tokens is not frames x {pooled} + 1")
            if cursor + frames > feats.shape[0]:
                raise UnsupportedCallError(f"{feats.shape[0]} encoded frames for more video placeholder runs")
            flat_rows = sp.row * length + cols
            units = []
            step = 1 if per_frame else frames
            for f in range(0, frames, step):
                pos = torch.arange(f * pooled, (f + step) * pooled)
                sc = {k: v[cursor + f:cursor + f + step].reshape(step * pooled, -1) for k, v in maps.items()}
                sc = {k: (v[:, 0] if scores[k].dim() == 2 else v) for k, v in sc.items()}
                units.append(Unit(rows=flat_rows[pos], grid=(g, g), span_pos=pos, scores=sc, frames=step))
            out.append(ImageLayout(prefix=0, units=units, fixed=torch.tensor([n - 1]), length=n))
            cursor += frames
        if cursor != feats.shape[0]:
            raise UnsupportedCallError(f"{feats.shape[0]} encoded frames, the video placeholders account for {cursor}")
        return out

