"""LLaVA-1.5 family: ``LlavaForConditionalGeneration`` (model_type ``llava``).

Knowledge held here: the CLIP/SigLIP encoder layers (``model.model.vision_tower.encoder.layers``),
the feature layer from ``vision_feature_layer`` (hidden_states[i] is the output of layer i-1;
a list of layers scores from the last one), CLS presence from the tower type and
``vision_feature_select_strategy`` (``"default"`` drops CLS; ``"full"`` keeps it as a placeholder
token, which we always keep and count in the budget), the grid from the vision config, one
contiguous run of placeholders per image, and the Llama-style LLM (rotary ``rotate_half``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.errors import UnsupportedModelError
from tokenprune.family import Family, LLMAttention, VisionAttention
from tokenprune.registry import register_family
from tokenprune.stats import LayerDims
from tokenprune.strategies.base import LLMInfo, VisionInfo

#: LLMs whose attention applies rotary as Llama does (q/k projections, rotate_half)
ROTARY_LLMS = ("llama", "mistral", "qwen2", "qwen3", "vicuna")
CLS_TOWERS = ("clip_vision_model",)


def rotate_half_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama rotary on [B, H, L, d] with cos/sin [B, L, d] (the model's own function)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, x, cos, sin)[0]


class DecoderLLM:
    """The LLM side shared by the families whose language model is a Llama-style decoder
    (q/k projections, optional Qwen3 q/k norms after the head split, ``rotate_half`` rotary with
    the model's own precomputed cos/sin — M-RoPE included). Mixed into a :class:`Family`."""

    def llm_attention(self, layer: int) -> LLMAttention:
        attn = self.decoder_layers[layer].self_attn  # type: ignore[attr-defined]
        tcfg = self.model.config.text_config  # type: ignore[attr-defined]
        # Qwen3-style q/k norms act after the head split: read q/k after them
        q_src = getattr(attn, "q_norm", None) or attn.q_proj
        k_src = getattr(attn, "k_norm", None) or attn.k_proj
        return LLMAttention(module=attn, q_source=q_src, k_source=k_src,
                            num_heads=tcfg.num_attention_heads, num_kv_heads=tcfg.num_key_value_heads,
                            head_dim=attn.head_dim, scaling=attn.scaling, rotary=rotate_half_rotary)

    def llm_dims(self) -> tuple[LayerDims, int]:
        t = self.model.config.text_config  # type: ignore[attr-defined]
        hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        dims = LayerDims(hidden=t.hidden_size, q_dim=t.num_attention_heads * hd,
                         kv_dim=t.num_key_value_heads * hd, mlp=t.intermediate_size, gated=True)
        return dims, t.num_hidden_layers


def llava_core(family: Any, model: Any, model_type: str, class_name: str) -> Any:
    """The inner model of a LLaVA-style ``...ForConditionalGeneration`` (``model.model``), checked
    for the vision tower / projector / language model layout transformers 5.x gives it; binds
    ``family``'s ``outer``, ``vision_tower``, ``projector``, ``language_model``, ``decoder_layers``."""
    core = getattr(model, "model", model)
    for attr in ("vision_tower", "multi_modal_projector", "language_model"):
        if not hasattr(core, attr):
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type {model_type!r}) has no {attr}; expected the "
                f"transformers 5.x {class_name} layout")
    family.outer = core
    family.vision_tower = core.vision_tower
    family.projector = core.multi_modal_projector
    family.language_model = core.language_model
    family.decoder_layers = core.language_model.layers
    return core


def clip_attention(layer: Any) -> VisionAttention:
    """q/k sources of a CLIP / SigLIP encoder layer (``self_attn.q_proj`` / ``k_proj``)."""
    attn = layer.self_attn
    return VisionAttention(module=attn, q_source=attn.q_proj, k_source=attn.k_proj,
                           num_heads=attn.num_heads, scale=attn.scale)


def vision_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        obj: Any = tower
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UnsupportedModelError(f"cannot find the encoder layers of vision tower {type(tower).__name__}")


@register_family
class LlavaFamily(DecoderLLM, Family):
    name = "llava"
    model_types = ("llava",)

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        core = llava_core(self, model, "llava", "LlavaForConditionalGeneration")
        cfg = model.config
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        self._vision_layers = vision_encoder_layers(core.vision_tower)
        n_layers = len(self._vision_layers)
        vfl = cfg.vision_feature_layer
        vfl = vfl[-1] if isinstance(vfl, (list, tuple)) else vfl
        feature_layer = vfl % (n_layers + 1) - 1          # hidden_states[i] = output of layer i-1
        has_cls = vcfg.model_type in CLS_TOWERS
        select = cfg.vision_feature_select_strategy
        if select == "default" and not has_cls:
            raise UnsupportedModelError(
                f"vision tower {vcfg.model_type!r} has no CLS token but vision_feature_select_strategy "
                "is 'default' (drops one patch); the token grid is not rectangular")
        side = vcfg.image_size // vcfg.patch_size
        self.num_prefix = 1 if (has_cls and select == "full") else 0
        self.vision_info = VisionInfo(num_layers=n_layers, feature_layer=feature_layer,
                                      grid=(side, side), has_cls=has_cls)
        self.llm_info = LLMInfo(num_layers=len(self.decoder_layers))
        self.image_token_id = int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)
        provides = {"features", "llm_attention"} if tcfg.model_type in ROTARY_LLMS else {"features"}
        if feature_layer >= 0:
            provides |= {"mean_attention", "keys"} | ({"cls_attention"} if has_cls else set())
        self.provides = frozenset(provides)

    def vision_attention(self, layer: int) -> VisionAttention:
        return clip_attention(self._vision_layers[layer])

    def vision_dims(self) -> tuple[LayerDims, int, int]:
        v = self.model.config.vision_config
        h, w = self.vision_info.grid
        dims = LayerDims(hidden=v.hidden_size, q_dim=v.hidden_size, kv_dim=v.hidden_size,
                         mlp=v.intermediate_size, gated=False)
        return dims, self.vision_info.num_layers, h * w + (1 if self.vision_info.has_cls else 0)

