"""Attention scores without giving up fast attention kernels.

Layers keep computing their outputs with their own kernel (SDPA / flash / eager). The engine
catches the q and k projections of the few layers a strategy needs with forward hooks and
calls these functions, which materialise softmax rows only as far as the requested reduction
needs them, in row chunks, in float32. Pure torch.
"""
from __future__ import annotations

import torch

#: rows of the softmax materialised at once (bounds memory to heads*chunk*N floats per image)
CHUNK_ROWS = 128


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d] float32."""
    b, n, _ = x.shape
    return x.reshape(b, n, n_heads, -1).transpose(1, 2).float()


def vision_reductions(q: torch.Tensor, k: torch.Tensor, n_heads: int, scale: float,
                      kinds: set[str], chunk_rows: int = CHUNK_ROWS) -> dict[str, torch.Tensor]:
    """Reductions of softmax(q k^T * scale) for a non-causal, unmasked encoder layer.

    q, k: [B, N, H*d] projection outputs (before the head split).
    Returns any of: ``"cls"`` [B, N] row 0 (head mean), ``"mean"`` [B, N] attention received
    (mean over heads and all query rows), ``"keys"`` [B, N, d] head-mean keys.
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
            for start in range(0, n, chunk_rows):
                p = torch.softmax((qh[:, :, start:start + chunk_rows] @ kt) * scale, dim=-1)
                acc += p.sum(dim=(1, 2))
            out["mean"] = acc / (h * n)
    return out


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
