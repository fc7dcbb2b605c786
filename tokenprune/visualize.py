"""Overlays of kept visual tokens on the input image (PIL in, PIL out).

Geometry: every visual token of an image is a box in the *original* image's pixel coordinates
(``boxes`` [N, 4] as x0, y0, x1, y1), computed from how the processor resized / cropped it.
Kept tokens stay bright, dropped ones are dimmed, tokens merged into a kept token are tinted with
that token's group colour, and kept tokens are outlined.

    boxes = llava_boxes(image.size, grid=(24, 24), processor=processor.image_processor)
    overlay(image, stats.kept_indices[0][0], boxes, stats.merge_groups[0][0])
"""
from __future__ import annotations

import colorsys
import math
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

#: the legend of every overlay (ASCII: the default font has no arrows)
LEGEND = "bright = kept, dimmed = dropped, tinted = merged into a kept token"


def _size_of(processor: Any) -> tuple[str, int, int]:
    """('short', side, crop) for shortest-edge resize + centre crop, or ('squash', h, w)."""
    size = {k: v for k, v in dict(getattr(processor, "size", None) or {}).items() if v is not None}
    crop = {k: v for k, v in dict(getattr(processor, "crop_size", None) or {}).items() if v is not None}
    do_crop = getattr(processor, "do_center_crop", False) and crop
    if "shortest_edge" in size:
        return ("short", int(size["shortest_edge"]), int(crop.get("height", size["shortest_edge"])) if do_crop else -1)
    if "height" in size:
        return ("squash", int(size["height"]), int(size["width"]))
    raise ValueError(f"cannot read the resize geometry of {type(processor).__name__}: size={size}")


def llava_boxes(image_size: tuple[int, int], grid: tuple[int, int], processor: Any) -> torch.Tensor:
    """Boxes [h*w, 4] of a LLaVA-1.5 grid (raster order) in original-image coordinates.

    ``image_size``: (W, H) of the original image; ``processor``: its image processor (CLIP:
    shortest-edge resize then centre crop; SigLIP: resize to height x width)."""
    w0, h0 = image_size
    gh, gw = grid
    kind, a, b = _size_of(processor)
    if kind == "squash":
        sx, sy, ox, oy, side_x, side_y = w0 / b, h0 / a, 0.0, 0.0, float(b), float(a)
    else:
        scale = a / min(w0, h0)                           # resized = original * scale
        rw, rh = w0 * scale, h0 * scale
        crop = float(b) if b > 0 else None
        cw, ch = (crop or rw), (crop or rh)
        ox, oy = (rw - cw) / 2, (rh - ch) / 2              # crop offset in resized coordinates
        sx = sy = 1 / scale
        side_x, side_y = cw, ch
    cols = torch.arange(gw, dtype=torch.float32)
    rows = torch.arange(gh, dtype=torch.float32)
    x0 = (ox + cols * side_x / gw) * sx
    x1 = (ox + (cols + 1) * side_x / gw) * sx
    y0 = (oy + rows * side_y / gh) * sy
    y1 = (oy + (rows + 1) * side_y / gh) * sy
    return torch.stack([x0[None].expand(gh, gw), y0[:, None].expand(gh, gw),
                        x1[None].expand(gh, gw), y1[:, None].expand(gh, gw)], dim=-1).reshape(-1, 4)


def merged_patch_boxes(image_size: tuple[int, int], resized: tuple[int, int], patch: int = 14,
                       merge: int = 2) -> torch.Tensor:
    """Boxes of Qwen2-VL-style tokens (``merge`` x ``merge`` patches of ``patch`` px each, raster
    order over the resized (H', W') image) in original-image coordinates."""
    w0, h0 = image_size
    rh, rw = resized
    cell = patch * merge
    gh, gw = rh // cell, rw // cell
    xs = torch.arange(gw + 1, dtype=torch.float32) * cell * w0 / rw
    ys = torch.arange(gh + 1, dtype=torch.float32) * cell * h0 / rh
    x0, x1 = xs[:-1][None].expand(gh, gw), xs[1:][None].expand(gh, gw)
    y0, y1 = ys[:-1][:, None].expand(gh, gw), ys[1:][:, None].expand(gh, gw)
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4)


def uniform_boxes(image_size: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Boxes [rows*cols, 4] of a grid that tiles the whole image (raster order)."""
    w0, h0 = image_size
    xs = torch.arange(cols + 1, dtype=torch.float32) * w0 / cols
    ys = torch.arange(rows + 1, dtype=torch.float32) * h0 / rows
    x0, x1 = xs[:-1][None].expand(rows, cols), xs[1:][None].expand(rows, cols)
    y0, y1 = ys[:-1][:, None].expand(rows, cols), ys[1:][:, None].expand(rows, cols)
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4)


def anyres_overlay(image: Image.Image, kept: torch.Tensor, side: int, rows: int, cols: int,
                   groups: torch.Tensor | None = None) -> Image.Image:
    """LLaVA-NeXT / OneVision: kept tokens of one image's placeholder run (positions in the run:
    ``side``² base-crop tokens, then ``rows`` x (``cols`` + newline)) drawn as two panels in
    original-image coordinates — the base crop's grid and the high-resolution canvas (which tiles
    the image after unpadding)."""
    kept = torch.as_tensor(kept).long()
    g2 = side * side
    base_kept = kept[kept < g2]
    panels = [overlay(image, base_kept, uniform_boxes(image.size, side, side),
                      None if groups is None else groups[:g2])]
    titles = [f"base crop ({side}x{side})"]
    if rows and cols:
        rest = kept[kept >= g2] - g2
        canvas_kept = (rest // (cols + 1)) * cols + rest % (cols + 1)
        canvas_kept = canvas_kept[rest % (cols + 1) < cols]              # newline tokens have no box
        panels.append(overlay(image, canvas_kept, uniform_boxes(image.size, rows, cols),
                              None if groups is None else groups[g2:]))
        titles.append(f"high-res canvas ({rows}x{cols})")
    return grid(panels, titles, cols=len(panels), cell=max(256, max(image.size)))


def _palette(n: int) -> list[tuple[int, int, int]]:
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.75, 1.0)
        out.append((int(255 * r), int(255 * g), int(255 * b)))
    return out


def overlay(image: Image.Image, kept: torch.Tensor | Sequence[int], boxes: torch.Tensor,
            groups: torch.Tensor | None = None, dim: float = 0.25, outline: bool = True) -> Image.Image:
    """``image`` with dropped tokens dimmed to ``dim`` brightness, merged tokens tinted with their
    group's colour, kept tokens outlined. ``kept``: token indices; ``groups``: [N] per token the
    position in ``kept`` it was merged into (-1 dropped), as ``PruneStats.merge_groups``."""
    base = image.convert("RGB")
    kept = torch.as_tensor(kept, dtype=torch.long).flatten()
    n = boxes.shape[0]
    if kept.numel() and (int(kept.max()) >= n or int(kept.min()) < 0):
        raise ValueError(f"kept indices out of range for {n} token boxes")
    state = torch.zeros(n, dtype=torch.long)            # 0 dropped, 1 kept, 2 merged
    state[kept] = 1
    if groups is not None:
        groups = torch.as_tensor(groups).flatten()
        state[(groups >= 0) & (state == 0)] = 2
    dimmed = Image.blend(base, Image.new("RGB", base.size), 1 - dim)
    mask = Image.new("L", base.size, 0)
    tint = Image.new("RGB", base.size)
    md, td = ImageDraw.Draw(mask), ImageDraw.Draw(tint)
    colours = _palette(max(1, kept.numel()))
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        box = (math.floor(x0), math.floor(y0), math.ceil(x1) - 1, math.ceil(y1) - 1)
        if state[i] == 1:
            md.rectangle(box, fill=255)
        elif state[i] == 2:
            md.rectangle(box, fill=150)
            td.rectangle(box, fill=colours[int(groups[i]) % len(colours)])  # type: ignore[index]
    out = Image.composite(base, dimmed, mask)
    if groups is not None:
        tmask = mask.point(lambda v: 110 if v == 150 else 0)
        out = Image.composite(tint, out, tmask)
    if outline:
        d = ImageDraw.Draw(out)
        for k, i in enumerate(kept.tolist()):
            x0, y0, x1, y1 = boxes[i].tolist()
            colour = colours[k % len(colours)] if groups is not None else (255, 255, 0)
            d.rectangle((math.floor(x0), math.floor(y0), math.ceil(x1) - 1, math.ceil(y1) - 1), outline=colour)
    return out


def _font(size: int) -> Any:
    """Pillow's default font at ``size`` px (scalable since Pillow 10.1; the fixed bitmap before)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _fit(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled to fit a ``side`` px square: small ones enlarged by a whole factor with
    nearest-neighbour (token boxes stay crisp), large ones shrunk."""
    factor = side // max(image.size)
    if factor >= 2:
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    im = image.copy()
    im.thumbnail((side, side))
    return im


def _wrap(text: str, font: Any, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` px."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def annotate(image: Image.Image, lines: Sequence[str], min_width: int = 448, size: int = 14) -> Image.Image:
    """``image`` enlarged to at least ``min_width`` px wide (by a whole factor, nearest-neighbour)
    under a white header of ``lines`` (title, legend), wrapped to the width: a PNG to read on its own."""
    factor = max(1, math.ceil(min_width / image.width))
    big = image.convert("RGB").resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    font, pad = _font(size), 6
    draw = ImageDraw.Draw(big)
    wrapped = [w for line in lines for w in _wrap(line, font, big.width - 2 * pad, draw)]
    line_h = size + 4
    head = 2 * pad + line_h * len(wrapped)
    out = Image.new("RGB", (big.width, big.height + head), (255, 255, 255))
    out.paste(big, (0, head))
    d = ImageDraw.Draw(out)
    for k, line in enumerate(wrapped):
        d.text((pad, pad + k * line_h), line, fill=(0, 0, 0), font=font)
    return out


def grid(images: Sequence[Image.Image], titles: Sequence[str] | None = None, cols: int = 4,
         cell: int = 256) -> Image.Image:
    """Images side by side (each fitted into ``cell`` px: small ones enlarged by a whole factor)
    with a title line above each; used for frame grids of videos and for ``tokenprune compare``."""
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    title_h = 16 if titles else 0
    sheet = Image.new("RGB", (cols * cell, rows * (cell + title_h)), (255, 255, 255))
    d, font = ImageDraw.Draw(sheet), _font(12)
    for k, img in enumerate(images):
        im = _fit(img, cell)
        x, y = (k % cols) * cell, (k // cols) * (cell + title_h)
        sheet.paste(im, (x + (cell - im.width) // 2, y + title_h))
        if titles:
            d.text((x + 4, y + 1), titles[k], fill=(0, 0, 0), font=font)
    return sheet


def frames_overlay(frames: Sequence[Image.Image], kept: Sequence[torch.Tensor], boxes: torch.Tensor,
                   cols: int = 4, titles: Sequence[str] | None = None) -> Image.Image:
    """A video as a grid of frames, each with its own kept tokens (same token geometry per frame)."""
    return grid([overlay(f, k, boxes) for f, k in zip(frames, kept)],
                list(titles) if titles is not None else [f"frame {i}" for i in range(len(frames))], cols)


def video_overlay(frames: Sequence[Image.Image], kept: torch.Tensor, per_frame: int, boxes: torch.Tensor,
                  frame_step: int = 1) -> Image.Image:
    """Kept tokens of one video's placeholder run (frame-major, ``per_frame`` tokens per token
    frame; a trailing newline has none) on the frames that token frame ``t`` stands for
    (``frames[t * frame_step]``: Qwen merges 2 frames per temporal patch)."""
    kept = torch.as_tensor(kept).long()
    n = len(frames) // frame_step
    per = [kept[(kept // per_frame) == t] % per_frame for t in range(n)]
    shown = [frames[t * frame_step] for t in range(n)]
    titles = [f"frames {t * frame_step}-{t * frame_step + frame_step - 1}" if frame_step > 1 else f"frame {t}"
              for t in range(n)]
    return frames_overlay(shown, per, boxes, titles=titles)
