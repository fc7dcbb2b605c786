"""Scores from vLLM's own vision encoder: forward hooks on the packed ``qkv_proj`` of the scored
layers, reduced with :func:`tokenprune.attention.vision_reductions` (the code the transformers path
uses). No attention weights are materialised by the encoder; its kernels stay as they are.

Captured tensors live only inside :meth:`QKCapture.run` (one encoder call), never on modules
between calls.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..attention import vision_reductions

Scores = dict[tuple[int, str], torch.Tensor]


class QKCapture:
    """``projections``: layer -> the layer's ``qkv_proj`` (output ``[..., 3*H_local*d]`` or a tuple
    whose first item is); ``kinds``: layer -> reductions to compute; ``gather``: all-gather the
    local heads of a tensor-parallel encoder (None: not sharded)."""

    def __init__(self, projections: dict[int, nn.Module], kinds: dict[int, set[str]], num_heads: int,
                 scale: float, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.kinds, self.num_heads, self.scale, self.gather = kinds, num_heads, scale, gather
        self._box: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.handles = [m.register_forward_hook(partial(self._grab, layer)) for layer, m in projections.items()]

    def _grab(self, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._box is None:
            return
        out = output[0] if isinstance(output, tuple) else output
        q, k, _ = out.chunk(3, dim=-1)
        if self.gather is not None:   # tensor parallel: heads are sharded over the ranks, in order
            q, k = self.gather(q.contiguous()), self.gather(k.contiguous())
        self._box[layer] = (q, k)

    @contextlib.contextmanager
    def run(self) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Capture q/k of every hooked layer during one encoder call (layer -> (q, k))."""
        self._box = {}
        try:
            yield self._box
        finally:
            self._box = None

    def reduce(self, box: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Scores:
        """Reductions of the captured q/k ([B, N, H*d]) -> (layer, kind) -> [B, N] / [B, N, d]."""
        out: Scores = {}
        for layer, (q, k) in box.items():
            for kind, v in vision_reductions(q, k, self.num_heads, self.scale, self.kinds[layer]).items():
                out[(layer, kind)] = v
        return out
