"""Fixed evaluation splits (deterministic from their seeds; training uses an open stream from
``--seed``, validation ``10_000 + seed``, the test split ``TEST_SEED``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .questions import sample_question
from .scenes import Scene, sample_scene

TEST_SEED = 20_000


@dataclass(frozen=True)
class Sample:
    scene: Scene
    question: str
    answer: str
    qtype: str


def split(n: int, seed: int = TEST_SEED) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = sample_scene(rng)
        q, a, t = sample_question(s, rng)
        out.append(Sample(s, q, a, t))
    return out
