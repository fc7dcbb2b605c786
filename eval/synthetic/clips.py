"""Video clips for the tiny video model: a static textured background with the objects of a
scene, and one event per clip — an object **moves** across the frame, an object **appears**
part-way, or an object **changes colour** part-way — plus one-word questions about it.

Deterministic from a seed (numpy sampling, the image renderer of :mod:`.scenes` per frame: the
background and its noise are identical in every frame, so only the event's patches change — the
redundancy HoliTom's temporal merging exploits).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .questions import NUMBERS
from .scenes import COLOR_NAMES, IMAGE_SIZE, SIZES, Obj, Scene, render, sample_scene

FRAMES = 8
EVENTS = ("move", "appear", "recolor")
VIDEO_TYPES = ("moves", "direction", "appears", "turns", "count_end")
VIDEO_WORDS = "which shape moves left or right : where does the go what appears color turn how many objects are there at end".split()


@dataclass(frozen=True)
class Clip:
    """``scene``: the objects at the start (an appearing object included, hidden before ``at``);
    ``target``: index of the object the event is about; ``to``: end position (move) or new
    colour (recolor); ``at``: first frame of the change (appear / recolor)."""

    scene: Scene
    event: str
    target: int
    at: int = 0
    to: tuple[int, int] | str | None = None

    def frame(self, t: int, frames: int = FRAMES) -> Scene:
        objs = list(self.scene.objects)
        o = objs[self.target]
        if self.event == "move":
            x1, y1 = self.to  # type: ignore[misc]
            a = t / max(1, frames - 1)
            objs[self.target] = replace(o, x=round(o.x + a * (x1 - o.x)), y=round(o.y + a * (y1 - o.y)))
        elif self.event == "appear" and t < self.at:
            del objs[self.target]
        elif self.event == "recolor" and t >= self.at:
            objs[self.target] = replace(o, color=self.to)  # type: ignore[arg-type]
        return Scene(tuple(objs), self.scene.texture_seed)


def sample_clip(rng: np.random.Generator, frames: int = FRAMES) -> Clip:
    """A scene of 1-3 objects (2-3 for appear) and one event about an object with a unique shape."""
    event = EVENTS[int(rng.integers(len(EVENTS)))]
    while True:
        scene = sample_scene(rng, 2 if event == "appear" else 1, 3)
        shapes = [o.shape for o in scene.objects]
        unique = [i for i, s in enumerate(shapes) if shapes.count(s) == 1]
        if unique:
            break
    target = unique[int(rng.integers(len(unique)))]
    o = scene.objects[target]
    if event == "move":                    # horizontal travel of >= 80 px, a little vertical drift
        r = SIZES[o.size] + 2
        for _ in range(50):
            x1 = int(rng.integers(r, IMAGE_SIZE - r))
            if abs(x1 - o.x) >= 80:
                break
        else:
            x1 = r if o.x > IMAGE_SIZE // 2 else IMAGE_SIZE - r
        y1 = int(np.clip(o.y + rng.integers(-20, 21), r, IMAGE_SIZE - r))
        return Clip(scene, event, target, to=(x1, y1))
    at = int(rng.integers(2, frames - 1))
    if event == "recolor":
        new = [c for c in COLOR_NAMES if c != o.color]
        return Clip(scene, event, target, at=at, to=new[int(rng.integers(len(new)))])
    return Clip(scene, event, target, at=at)


def ask_clip(clip: Clip, qtype: str) -> tuple[str, str] | None:
    o = clip.scene.objects[clip.target]
    if qtype == "moves" and clip.event == "move":
        return "which shape moves", o.shape
    if qtype == "direction" and clip.event == "move":
        return f"left or right : where does the {o.shape} go", "left" if clip.to[0] < o.x else "right"  # type: ignore[index]
    if qtype == "appears" and clip.event == "appear":
        return "what shape appears", o.shape
    if qtype == "turns" and clip.event == "recolor":
        return f"what color does the {o.shape} turn", clip.to  # type: ignore[return-value]
    if qtype == "count_end":
        return "how many objects are there at the end", NUMBERS[len(clip.scene.objects) - 1]
    return None


def sample_clip_question(clip: Clip, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, type): the event's own question 4 times in 5, else the final count."""
    own = {"move": ("moves", "direction"), "appear": ("appears",), "recolor": ("turns",)}[clip.event]
    qtype = "count_end" if rng.random() < 0.2 else own[int(rng.integers(len(own)))]
    qa = ask_clip(clip, qtype)
    assert qa is not None
    return qa[0], qa[1], qtype


def render_clips(clips: list[Clip], frames: int = FRAMES, device: str | torch.device = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [B, F, 3, 224, 224] in [0, 1] and per-patch labels [B, F, 16, 16, 3]."""
    imgs, labels = [], []
    for t in range(frames):               # one render call per frame index: the same background noise
        im, lab = render([c.frame(t, frames) for c in clips], device)
        imgs.append(im)
        labels.append(lab)
    return torch.stack(imgs, 1), torch.stack(labels, 1)


@dataclass(frozen=True)
class ClipSample:
    clip: Clip
    question: str
    answer: str
    qtype: str


def clip_split(n: int, seed: int) -> list[ClipSample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = sample_clip(rng)
        q, a, t = sample_clip_question(c, rng)
        out.append(ClipSample(c, q, a, t))
    return out


__all__ = ["Clip", "ClipSample", "EVENTS", "FRAMES", "Obj", "VIDEO_TYPES", "VIDEO_WORDS", "ask_clip", "clip_split",
           "render_clips", "sample_clip", "sample_clip_question"]
