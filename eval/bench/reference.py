"""The official-style selection: the whole vision tower in eager attention with
``output_attentions=True`` (what the official HiPrune / VisionZip code does), scores read from the
returned [B, H, N, N] maps, the same ``select`` function, the projector run on the kept tokens.

Used only to measure what our capture approach saves, and that it selects the same tokens.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tokenprune.family import Family
from tokenprune.patches.llava import vision_encoder_layers
from tokenprune.strategies.base import StrategySpec, VisualTokens


def eager_copy(tower: nn.Module) -> nn.Module:
    """A copy of ``tower`` with eager attention and the same weights (config deep-copied, so the
    user's model and its sub-configs are never switched)."""
    p = next(tower.parameters())
    with torch.device(p.device):
        twin = type(tower)._from_config(copy.deepcopy(tower.config), attn_implementation="eager", dtype=p.dtype)
    twin.load_state_dict(tower.state_dict())
    return twin.eval()


@torch.no_grad()
def official_select(family: Family, eager: nn.Module, spec: StrategySpec, cfg: Any, n_keep: int,
                    pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Kept indices per image and the projected kept features [n_img, n_keep, D_llm]."""
    info = family.vision_info
    requests = spec.requests(cfg, info)  # type: ignore[misc]
    key_layers = {r.layer for r in requests if r.kind == "keys"}
    keys: dict[int, torch.Tensor] = {}
    hooks = []
    layers = vision_encoder_layers(eager)
    for layer in key_layers:
        attn = layers[layer].self_attn
        heads = attn.num_heads

        def grab(module, args, out, layer=layer, heads=heads):
            b, n, _ = out.shape
            keys[layer] = out.reshape(b, n, heads, -1).float().mean(dim=2)
        hooks.append(attn.k_proj.register_forward_hook(grab))
    try:
        out = eager(pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    feats = out.hidden_states[info.feature_layer + 1]
    cls_off = 1 if info.has_cls else 0
    p = family.num_prefix
    feats = feats[:, cls_off - p:]                          # the projector input layout
    scores: dict[tuple[int, str], torch.Tensor] = {}
    for r in requests:
        if r.kind == "keys":
            scores[(r.layer, "keys")] = keys[r.layer]
        elif r.kind == "cls":
            scores[(r.layer, "cls")] = out.attentions[r.layer][:, :, 0].float().mean(dim=1)
        else:
            scores[(r.layer, "mean")] = out.attentions[r.layer].float().mean(dim=(1, 2))
    kept, chosen = [], []
    for i in range(feats.shape[0]):
        tokens = VisualTokens(grid=info.grid, features=feats[i, p:],
                              scores={k: v[i, cls_off:] for k, v in scores.items()})
        sel = spec.select(cfg, tokens, n_keep - p, info)  # type: ignore[misc]
        idx = sel.indices.to(feats.device)
        f = sel.features.to(feats.dtype) if sel.features is not None else feats[i, p + idx]
        chosen.append(torch.cat([feats[i, :p], f]))
        kept.append(idx.cpu())
    return kept, family.projector(torch.stack(chosen))
