"""Scenes: 1-4 objects (shape x colour x size) at random, non-overlapping positions on a textured,
cluttered, low-saturation background, so that only a few of the 16x16 patches carry the answer.

Sampling is numpy (``np.random.Generator(seed)``: the same scenes on any machine); rendering is
vectorised torch on any device. Images are quantised to uint8 levels so that training inputs
equal what the real image processor sees from the saved PNG / PIL image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.1, 0.25, 0.95),
          "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.15, 0.8), "orange": (1.0, 0.55, 0.0)}
COLOR_NAMES = tuple(COLORS)
SIZES = {"small": 14, "big": 22}       # radius in pixels (object ~2 or ~3 patches wide)
MAX_OBJECTS = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: int
    y: int

    @property
    def radius(self) -> int:
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    texture_seed: int


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = MAX_OBJECTS) -> Scene:
    """Objects with distinct (shape, colour) pairs, centres >= 8 px from the image midlines (so
    left/right and top/bottom are unambiguous) and no overlaps."""
    n = int(rng.integers(min_objects, max_objects + 1))
    objs: list[Obj] = []
    pairs: set[tuple[str, str]] = set()
    while len(objs) < n:
        shape, color = SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        size = ("small", "big")[rng.integers(2)]
        r = SIZES[size]
        if (shape, color) in pairs:
            continue
        for _ in range(50):
            x, y = (int(v) for v in rng.integers(r + 2, IMAGE_SIZE - r - 2, size=2))
            if min(abs(x - IMAGE_SIZE // 2), abs(y - IMAGE_SIZE // 2)) < 8:
                continue
            if all((x - o.x) ** 2 + (y - o.y) ** 2 > (r + o.radius + 6) ** 2 for o in objs):
                objs.append(Obj(shape, color, size, x, y))
                pairs.add((shape, color))
                break
        else:
            break
    return Scene(tuple(objs), int(rng.integers(2**31)))


N_BLOBS = 6


def _params(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per-image background parameters (from each scene's texture seed) and padded object slots."""
    b = len(scenes)
    p = {k: np.zeros(shape, np.float32) for k, shape in {
        "base": (b,), "tint": (b, 3), "grating": (b, 3, 3), "coarse": (b, 8, 8), "blobs": (b, N_BLOBS, 5),
        "obj": (b, MAX_OBJECTS, 8)}.items()}
    for i, s in enumerate(scenes):
        r = np.random.default_rng(s.texture_seed)
        p["base"][i] = 0.35 + 0.3 * r.random()
        p["tint"][i] = 0.06 * (r.random(3) - 0.5)
        p["grating"][i] = r.random((3, 3)) * [0.25, 6.28, np.pi] + [0.05, 0, 0]
        p["coarse"][i] = r.random((8, 8))
        # clutter: grey ellipses (x, y, rx, ry, level offset)
        p["blobs"][i] = r.random((N_BLOBS, 5)) * [IMAGE_SIZE, IMAGE_SIZE, 14, 14, 0.3] + [0, 0, 4, 4, -0.15]
        for j, o in enumerate(s.objects):
            shade = 1.0 + 0.08 * (r.random() - 0.5)
            p["obj"][i, j] = (o.x, o.y, o.radius, SHAPES.index(o.shape) + 1,
                              *(np.clip(np.array(COLORS[o.color]) * shade, 0, 1)), COLOR_NAMES.index(o.color) + 1)
    return p


def render(scenes: list[Scene], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, 224, 224] in [0, 1] (uint8 levels) and per-patch labels [B, 16, 16, 3]
    (colour index + 1, shape index + 1, object-centre flag; 0 = background). Vectorised over the
    batch; the same scenes render to the same images on CPU and GPU up to float rounding."""
    b = len(scenes)
    p = {k: torch.from_numpy(v).to(device) for k, v in _params(scenes).items()}
    ar = torch.arange(IMAGE_SIZE, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(ar, ar, indexing="ij")
    yy, xx = yy[None, None], xx[None, None]                                  # [1, 1, H, W]
    f, ph, ang = (p["grating"][..., k, None, None] for k in range(3))       # [B, 3, 1, 1]
    tex = 0.06 * torch.sin(f * (xx * torch.cos(ang) + yy * torch.sin(ang)) + ph).sum(1)
    tex = tex + 0.15 * (torch.nn.functional.interpolate(p["coarse"][:, None], size=IMAGE_SIZE,
                                                        mode="bilinear")[:, 0] - 0.5)
    g = torch.Generator(device=device).manual_seed(scenes[0].texture_seed if scenes else 0)
    tex = tex + 0.05 * (torch.rand(b, IMAGE_SIZE, IMAGE_SIZE, generator=g, device=device) - 0.5)
    bl = p["blobs"][..., None, None]                                          # [B, K, 5, 1, 1]
    inside = ((xx - bl[:, :, 0]) / bl[:, :, 2]) ** 2 + ((yy - bl[:, :, 1]) / bl[:, :, 3]) ** 2 <= 1
    tex = tex + (inside * bl[:, :, 4]).sum(1)
    img = (p["base"][:, None, None, None] + tex[:, None] + p["tint"][..., None, None]).clamp(0, 1)
    img = img.expand(b, 3, IMAGE_SIZE, IMAGE_SIZE).clone()
    o = p["obj"][..., None, None]                                             # [B, S, 7, 1, 1]
    dx, dy, r, kind = xx - o[:, :, 0], yy - o[:, :, 1], o[:, :, 2], o[:, :, 3]
    circle = dx * dx + dy * dy <= r * r
    square = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    triangle = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.55)     # apex up
    cross = ((dx.abs() <= r * 0.3) & (dy.abs() <= r)) | ((dy.abs() <= r * 0.3) & (dx.abs() <= r))
    masks = ((kind == 1) & circle) | ((kind == 2) & square) | ((kind == 3) & triangle) | ((kind == 4) & cross)
    for j in range(MAX_OBJECTS):
        img = torch.where(masks[:, j, None], o[:, j, 4:7], img)
    # labels: objects never overlap, so a max over slots picks the covering object's class
    cover = masks.float().reshape(b, MAX_OBJECTS, GRID, PATCH, GRID, PATCH).mean(dim=(3, 5)) > 0.3
    ids = p["obj"][:, :, [7, 3]].long()                                      # [B, S, 2] colour, shape
    cls = (cover[..., None] * ids[:, :, None, None, :]).amax(dim=1)          # [B, 16, 16, 2]
    cy = (p["obj"][:, :, 1] // PATCH).long().clamp(max=GRID - 1)
    cx = (p["obj"][:, :, 0] // PATCH).long().clamp(max=GRID - 1)
    centre = torch.zeros(b, GRID * GRID, device=device)
    centre.scatter_(1, cy * GRID + cx, (p["obj"][:, :, 2] > 0).float())       # empty slots add 0
    labels = torch.cat([cls, centre.reshape(b, GRID, GRID, 1).long()], dim=-1)
    return (img * 255).round() / 255, labels


def to_pil(img: torch.Tensor):
    """[3, H, W] in [0, 1] -> PIL RGB image (exact: images are on uint8 levels)."""
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
