"""A scratch family: ViP-LLaVA (``VipLlavaForConditionalGeneration``, model_type ``vipllava``).

One file. Knowledge held here: a CLIP tower whose CLS is always dropped, projector input = the
patch features of several encoder layers concatenated ([n_img, N, L*D], one row per placeholder,
so selection at the projector input keeps rows as for LLaVA-1.5); scores come from the deepest of
those layers; a Llama-style LLM.
"""
from __future__ import annotations

from torch import nn

from tokenprune import register_family
from tokenprune.errors import UnsupportedModelError
from tokenprune.family import Family, VisionAttention
from tokenprune.patches.llava import ROTARY_LLMS, DecoderLLM, clip_attention, vision_encoder_layers
from tokenprune.stats import LayerDims
from tokenprune.strategies.base import LLMInfo, VisionInfo


@register_family
class VipLlavaFamily(DecoderLLM, Family):
    name = "vipllava"
    model_types = ("vipllava",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        core = getattr(model, "model", model)
        for attr in ("vision_tower", "multi_modal_projector", "language_model"):
            if not hasattr(core, attr):
                raise UnsupportedModelError(f"{type(model).__name__} has no {attr}")
        cfg = model.config
        self.outer, self.vision_tower = core, core.vision_tower
        self.projector, self.language_model = core.multi_modal_projector, core.language_model
        self.decoder_layers = core.language_model.layers
        self._layers = vision_encoder_layers(core.vision_tower)
        n = len(self._layers)
        used = getattr(cfg, "vision_feature_layer", None)
        used = getattr(cfg, "vision_feature_layers", None) if used is None else used
        used = [used] if isinstance(used, int) else list(used)
        deepest = max(i % (n + 1) for i in used) - 1     # hidden_states[i] = output of layer i-1
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.num_prefix = 0
        self.vision_info = VisionInfo(num_layers=n, feature_layer=deepest, grid=(side, side), has_cls=True)
        self.llm_info = LLMInfo(num_layers=len(self.decoder_layers))
        self.image_token_id = int(cfg.image_token_id)
        llm = {"llm_attention"} if cfg.text_config.model_type in ROTARY_LLMS else set()
        self.provides = frozenset({"features", "mean_attention", "keys", "cls_attention"} | llm)

    def vision_attention(self, layer: int) -> VisionAttention:
        return clip_attention(self._layers[layer])

    def vision_dims(self) -> tuple[LayerDims, int, int]:
        v = self.model.config.vision_config
        h, w = self.vision_info.grid
        dims = LayerDims(hidden=v.hidden_size, q_dim=v.hidden_size, kv_dim=v.hidden_size,
                         mlp=v.intermediate_size, gated=False)
        return dims, self.vision_info.num_layers, h * w + 1
