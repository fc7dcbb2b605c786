"""Sequence helpers of the engine: gathering rows of per-token tensors with padding, packing
kept positions, masking "ghost" keys, and splitting a token budget over selection units. Pure
tensor / list functions (no model knowledge)."""
from __future__ import annotations

from typing import Any

import torch

from .errors import UnsupportedCallError


def take(x: torch.Tensor, idx: torch.Tensor, dim: int, fill: Any = 0, padded: bool | None = None) -> torch.Tensor:
    """Gather along ``dim`` with a per-row index ``idx`` [B, L'] (-1 = padding, filled with ``fill``).

    ``x`` has its batch at dim 0 (size B or 1, broadcast). ``padded``: whether ``idx`` holds any
    -1, when the caller knows it (None: looked up, one host sync).
    """
    b, n = idx.shape
    dim = dim % x.dim()
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    view = [1] * x.dim()
    view[0], view[dim] = b, n
    target = list(x.shape)
    target[dim] = n
    gidx = idx.clamp(min=0).to(x.device).view(view).expand(target)
    out = torch.gather(x, dim, gidx)
    pad = idx < 0
    if padded is None:
        padded = bool(pad.any())
    if padded:
        out = out.masked_fill(pad.to(x.device).view(view).expand(target), fill)
    return out


def take_positions(pos: torch.Tensor, idx: torch.Tensor, padded: bool | None = None) -> torch.Tensor:
    """Position ids [B, L] or [R, B, L] (M-RoPE rows) gathered along the sequence (pads -> 1)."""
    if pos.dim() == 3:
        return take(pos.transpose(0, 1), idx, 2, 1, padded).transpose(0, 1)
    return take(pos, idx, 1, 1, padded)


def left_packed_index(keep: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """keep [B, L] bool -> idx [B, max kept] of kept positions per row, left-padded with -1.

    ``width``: the largest row count when the caller knows it (then no host sync: a sort puts the
    -1 of the dropped positions first and the kept positions, ascending, last)."""
    if width is None:
        width = int(keep.sum(dim=1).max())
    pos = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    packed = torch.sort(torch.where(keep, pos, torch.full_like(pos, -1)), dim=1).values
    return packed[:, packed.shape[1] - width:] if width else packed[:, :0]


def run_lengths(mask: torch.Tensor) -> list[int]:
    """[B, L] bool -> the lengths of its runs of consecutive True, row by row (host syncs: one
    per row, where the runs end is data)."""
    lengths: list[int] = []
    for r in range(mask.shape[0]):
        pos = torch.nonzero(mask[r]).flatten()
        if pos.numel() == 0:
            continue
        breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
        bounds = [0] + breaks.tolist() + [pos.numel()]
        lengths.extend(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return lengths


def true_positions(mask: torch.Tensor, k: int) -> torch.Tensor:
    """[L] bool with exactly ``k`` True -> [k] their positions, ascending, without a host sync."""
    n = mask.shape[-1]
    pos = torch.arange(n, device=mask.device)
    return torch.sort(torch.where(mask, pos, pos + n)).values[:k]


def padding_mask(mask: Any, length: int) -> torch.Tensor | None:
    """[B, length] 1/0 padding mask of a prefill from its attention mask in any form: 2D as is; a
    4D [B, 1, Q, K] (or a dict of them, per layer type, as ``generate`` builds for static caches)
    read from the last query row, which sees every non-padding key of the prompt."""
    if mask is None:
        return None
    if isinstance(mask, dict):   # a None entry: the kernel's own causal path, no padding
        if "full_attention" not in mask:   # a sliding window hides far keys: not padding
            raise UnsupportedCallError(f"cannot read the padding of a prompt from masks {sorted(mask)} "
                                       "without a full-attention one; pass a 2D attention_mask")
        mask = mask["full_attention"]
        if mask is None:
            return None
    if not torch.is_tensor(mask):
        raise UnsupportedCallError(f"cannot read a padding mask from a {type(mask).__name__} attention mask "
                                   "(e.g. flex attention's BlockMask); pass a 2D attention_mask")
    if mask.dim() == 2:
        return mask
    row = mask[:, 0, -1, :length]
    ok = row if row.dtype == torch.bool else row == 0
    return ok.long()


def min_value(mask: torch.Tensor) -> Any:
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def mask_keys(mask: torch.Tensor, ghost: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Hide ghost keys (first ``n_keys`` key columns) of a 2D [B, K] or 4D [B, h, Q, K] mask;
    a ghost query still sees itself (so no softmax row is empty)."""
    g = torch.zeros(mask.shape[0], mask.shape[-1], dtype=torch.bool, device=mask.device)
    g[:, :n_keys] = ghost.to(mask.device)
    if mask.dim() == 2:
        return mask.masked_fill(g, 0)
    hide = g[:, None, None, :].expand(mask.shape[0], 1, mask.shape[-2], mask.shape[-1])
    if mask.shape[-2] == n_keys:  # prefill: keep the diagonal
        hide = hide & ~torch.eye(n_keys, dtype=torch.bool, device=mask.device)
    return mask.masked_fill(hide, min_value(mask))


def cache_of(kwargs: dict[str, Any]) -> Any:
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(out: Any) -> Any:
    """The KV cache of a model output: ``cache`` (transformers >= 5.24), else ``past_key_values``."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def seq_len(cache: Any, layer: int = 0) -> int:
    return int(cache.get_seq_length(layer)) if cache is not None else 0


def split_budget(total: int, sizes: list[int], weights: list[float] | None = None) -> list[int]:
    """Split ``total`` kept tokens over units of ``sizes`` tokens in proportion to ``weights``
    (default: evenly), largest remainder first (ties: the earlier unit); a unit never gets more than
    it has, the excess moves on to the others. Sums to ``min(total, sum(sizes))``."""
    w = [1.0] * len(sizes) if weights is None else [float(x) for x in weights]
    out = [0] * len(sizes)
    left, open_units = min(total, sum(sizes)), [i for i in range(len(sizes)) if sizes[i] > 0]
    while left > 0 and open_units:
        wsum = sum(w[i] for i in open_units) or float(len(open_units))
        exact = {i: left * (w[i] if wsum else 1.0) / wsum for i in open_units}
        give = {i: min(sizes[i] - out[i], int(exact[i])) for i in open_units}
        rest = left - sum(give.values())
        for i in sorted(open_units, key=lambda i: (-(exact[i] - int(exact[i])), i)):
            if rest <= 0:
                break
            if give[i] < sizes[i] - out[i]:
                give[i] += 1
                rest -= 1
        for i in open_units:
            out[i] += give[i]
            left -= give[i]
        open_units = [i for i in open_units if out[i] < sizes[i]]
        if rest > 0 and not any(give.values()):
            break
    return out
