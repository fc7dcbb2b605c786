"""Attention scores without giving up fast attention kernels.

Layers keep computing their outputs with their own kernel (SDPA / flash / eager). The engine
catches the q and k projections of the few layers a strategy needs with forward hooks and
calls these functions, which materialise softmax rows only as far as the requested reduction
needs them, in blocks of samples x query rows, in float32. Pure torch.
"""
from __future__ import annotations

import torch

#: softmax entries materialised at once per block of (samples x query rows): 2**20 floats (4 MB) keeps a
#: block in a CPU core's cache, which made the received-attention sum 3-4x faster than one block of
#: rows over the whole batch (B=8, N=577, 16 heads on 2 cores); on CUDA a larger block means fewer kernels
BLOCK_FLOATS = {"cpu": 2**20, "cuda": 2**25}


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d] float32."""
    b, n, _ = x.shape
    return x.reshape(b, n, n_heads, -1).transpose(1, 2).float()


def _blocks(b: int, h: int, n: int, device: torch.device, chunk_rows: int | None) -> tuple[int, int]:
    """(samples, query rows) per block so that samples * h * rows * n <= the device's block size."""
    if chunk_rows is not None:
        return 1, max(1, chunk_rows)
    budget = BLOCK_FLOATS.get(device.type, BLOCK_FLOATS["cuda"])
    rows = max(1, min(n, budget // (h * n)))
    samples = max(1, min(b, budget // (h * n * rows))) if rows == n else 1
    return samples, rows


def vision_reductions(q: torch.Tensor, k: torch.Tensor, n_heads: int, scale: float,
                      kinds: set[str], chunk_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Reductions of softmax(q k^T * scale) for a non-causal, unmasked encoder layer.

    q, k: [B, N, H*d] projection outputs (before the head split).
    Returns any of: ``"cls"`` [B, N] row 0 (head mean), ``"mean"`` [B, N] attention received
    (mean over heads and all query rows), ``"keys"`` [B, N, d] head-mean keys.
    The received-attention sum runs block by block (a few samples x a few query rows, bounded by
    :data:`BLOCK_FLOATS`), never holding the [B, H, N, N] matrix; the block sizes follow from the
    shapes alone (no host sync). ``chunk_rows`` fixes one sample x that many rows per block (tests).
    """
    out: dict[str, torch.Tensor] = {}
    kh = _heads(k, n_heads)
    if "keys" in kinds:
        out["keys"] = kh.mean(dim=1)
    if "cls" in kinds or "mean" in kinds:
        qh = _heads(q, n_heads)
        b, h, n, _ = qh.shape
        kt = kh.transpose(-1, -2)
        if "cls" in kinds:
            out["cls"] = torch.softmax((qh[:, :, :1] @ kt) * scale, dim=-1).mean(dim=1)[:, 0]
        if "mean" in kinds:
            acc = torch.zeros(b, n, dtype=torch.float32, device=q.device)
            samples, rows = _blocks(b, h, n, q.device, chunk_rows)
            for s0 in range(0, b, samples):
                s1 = min(b, s0 + samples)
                for r0 in range(0, n, rows):
                    p = torch.softmax((qh[s0:s1, :, r0:r0 + rows] @ kt[s0:s1]) * scale, dim=-1)   # [s, H, rows, N]
                    acc[s0:s1] += p.reshape(s1 - s0, -1, n).sum(dim=1)
            out["mean"] = acc / (h * n)
    return out


def segment_reductions(q: torch.Tensor, k: torch.Tensor, bounds: list[int], n_heads: int, scale: float,
                       kinds: set[str]) -> dict[str, torch.Tensor]:
    """:func:`vision_reductions` of a packed encoder (Qwen-VL: every image, frame or window is one
    segment of a flat sequence that attends only within itself).

    q, k: [S, H*d] (rotary already applied); ``bounds``: the segments' cumulative starts
    ``[0, s1, ..., S]`` (the encoder's ``cu_seqlens``). Returns per-row [S] / [S, d] reductions,
    each computed within its segment."""
    parts: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    for a, b in zip(bounds[:-1], bounds[1:]):
        red = vision_reductions(q[None, a:b], k[None, a:b], n_heads, scale, kinds)
        for kind, v in red.items():
            parts[kind].append(v[0])
    return {kind: torch.cat(v) for kind, v in parts.items()}


def last_row_attention(q_last: torch.Tensor, k: torch.Tensor, scaling: float,
                       key_valid: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax row of one query per sample (e.g. the last prompt token).

    q_last: [B, H, 1, d] (rotary applied); k: [B, Hkv, L, d] (rotary applied, GQA heads not
    repeated); key_valid: [B, L] bool (padding and future keys False). Returns [B, L].
    """
    b, h, _, d = q_last.shape
    hkv = k.shape[1]
    qg = q_last.float().reshape(b, hkv, h // hkv, d)            # group query heads per kv head
    logits = (qg @ k.float().transpose(-1, -2)) * scaling        # [B, Hkv, G, L]
    logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=(1, 2))


def rows_attention(q_rows: torch.Tensor, k: torch.Tensor, scaling: float, key_ok: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax rows of a few queries of one sample (e.g. the instruction's tokens).

    q_rows: [H, T, d] (rotary applied); k: [Hkv, L, d] (rotary applied, GQA heads not repeated);
    key_ok: [T, L] bool, the keys each query sees (causal and padding). Returns [T, L]."""
    h, t, d = q_rows.shape
    hkv = k.shape[0]
    qg = q_rows.float().reshape(hkv, h // hkv, t, d)
    logits = (qg @ k.float().transpose(-1, -2)[:, None]) * scaling         # [Hkv, G, T, L]
    logits = logits.masked_fill(~key_ok[None, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=(0, 1))
