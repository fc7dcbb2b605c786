"""Templated one-word questions about a scene. Each question ends on its key word (the
notes of earlier runs: the last prompt token is where a tiny LLM looks up the answer)."""
from __future__ import annotations

from collections import Counter

import numpy as np

from .scenes import COLOR_NAMES, IMAGE_SIZE, SHAPES, SIZES, Scene

NUMBERS = ("one", "two", "three", "four")
TYPES = ("color", "shape", "count", "exists", "side", "height", "size")
TEMPLATE_WORDS = "what color is the shape has how many objects are there a where left or right top bottom small big".split()
ANSWERS = tuple(COLOR_NAMES) + SHAPES + NUMBERS + ("yes", "no", "left", "right", "top", "bottom") + tuple(SIZES)
VOCAB = tuple(dict.fromkeys(TEMPLATE_WORDS + list(ANSWERS) + [":"]))


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of type ``qtype`` for ``scene``, or None if the type does not apply
    (e.g. "the circle" when there are two circles)."""
    objs = scene.objects
    shapes = Counter(o.shape for o in objs)
    colors = Counter(o.color for o in objs)
    unique_shape = [o for o in objs if shapes[o.shape] == 1]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    if qtype == "color" and unique_shape:
        o = pick(unique_shape)
        return f"what color is the {o.shape}", o.color
    if qtype == "shape":
        unique_color = [o for o in objs if colors[o.color] == 1]
        if unique_color:
            o = pick(unique_color)
            return f"what shape has the color {o.color}", o.shape
        return None
    if qtype == "count":
        return "how many objects are there", NUMBERS[len(objs) - 1]
    if qtype == "exists":
        if rng.random() < 0.5:
            o = pick(list(objs))
            return f"is there a {o.color} {o.shape}", "yes"
        present = {(o.color, o.shape) for o in objs}
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        # hard negatives half of the time: a colour and a shape that are both in the scene
        hard = [(c, s) for c, s in absent if colors[c] and shapes[s]]
        c, s = pick(hard) if hard and rng.random() < 0.5 else pick(absent)
        return f"is there a {c} {s}", "no"
    if qtype == "side" and unique_shape:
        o = pick(unique_shape)
        return f"left or right : where is the {o.shape}", "left" if o.x < IMAGE_SIZE // 2 else "right"
    if qtype == "height" and unique_shape:
        o = pick(unique_shape)
        return f"top or bottom : where is the {o.shape}", "top" if o.y < IMAGE_SIZE // 2 else "bottom"
    if qtype == "size":
        o = pick(list(objs))
        return f"small or big : the {o.color} {o.shape}", o.size
    return None


def sample_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, type), types drawn uniformly among those that apply."""
    while True:
        qtype = TYPES[int(rng.integers(len(TYPES)))]
        qa = ask(scene, qtype, rng)
        if qa is not None:
            return qa[0], qa[1], qtype
