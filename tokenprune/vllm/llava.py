"""LLaVA-1.5 under vLLM: ``LlavaForConditionalGeneration`` with tokenprune's selection.

The prompt reserves ``budget`` placeholders per image (the processing info's token count); the
encoder's q/k are caught by hooks on vLLM's own CLIP/SigLIP ``qkv_proj``; ``embed_multimodal``
returns, per image, the kept tokens in ascending order. vLLM numbers the positions of the prompt
it built contiguously, which is tokenprune's ``positions="compact"``.

Also maps checkpoints saved by transformers 5.x (vision tower without the ``vision_model.``
level) to the names vLLM's loader expects, pruning on or off.
"""
from __future__ import annotations

import re
from collections import deque
from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
    _get_num_hidden_layers,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..errors import IncompatibleStrategyError, UnsupportedModelError
from ..strategies.base import VisionInfo
from .capture import QKCapture
from .setup import Setup, apply_selection, check_layers, parse, select

#: transformers 5.x saves ``vision_tower.X`` for ``vision_tower.vision_model.X`` (hub checkpoints
#: have the level); regexes run before the class's prefix mapping, so both key styles are covered
VISION_LEVEL = WeightsMapper(orig_to_new_regex={
    re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model.",
})
CLS_TOWERS = ("clip_vision_model",)


def vision_facts(hf_config: Any) -> tuple[VisionInfo, int, frozenset[str]]:
    """(VisionInfo as the transformers family builds it, kept prefix tokens, capabilities)."""
    vcfg = hf_config.vision_config
    n_layers = vcfg.num_hidden_layers
    vfl = hf_config.vision_feature_layer
    vfl = vfl[-1] if isinstance(vfl, (list, tuple)) else vfl
    feature_layer = vfl % (n_layers + 1) - 1
    has_cls = vcfg.model_type in CLS_TOWERS
    side = vcfg.image_size // vcfg.patch_size
    prefix = 1 if (has_cls and hf_config.vision_feature_select_strategy == "full") else 0
    info = VisionInfo(num_layers=n_layers, feature_layer=feature_layer, grid=(side, side), has_cls=has_cls)
    provides = {"features", "mean_attention", "keys"} | ({"cls_attention"} if has_cls else set())
    return info, prefix, frozenset(provides)


def llava_setup(hf_config: Any) -> Setup | None:
    """Parse and check the configuration against this model (ConfigError & co. at start-up)."""
    setup = parse(hf_config, "LLaVA-1.5", positions="compact")
    if setup is None:
        return None
    if hf_config.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise UnsupportedModelError(f"tokenprune's vLLM LLaVA path handles CLIP / SigLIP towers; got "
                                    f"{hf_config.vision_config.model_type!r}")
    info, prefix, provides = vision_facts(hf_config)
    missing = setup.spec.needs - provides
    if missing:
        raise IncompatibleStrategyError(f"strategy {setup.spec.name!r} needs {sorted(missing)}, which this "
                                        f"LLaVA tower cannot provide")
    check_layers(setup.spec, setup.config, info, _get_num_hidden_layers(hf_config))
    h, w = info.grid
    setup.kept(h * w + prefix)     # budget > tokens: ConfigError now
    return setup


class TokenPruneLlavaInfo(LlavaProcessingInfo):
    """Reserves the kept count of placeholders per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        setup = llava_setup(self.get_hf_config())
        return n if setup is None else setup.kept(n)


@MULTIMODAL_REGISTRY.register_processor(_build_llava_or_pixtral_hf_processor, info=TokenPruneLlavaInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokenPruneLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA with tokenprune's vision-stage selection (off without ``hf_overrides['tokenprune']``)."""

    hf_to_vllm_mapper = VISION_LEVEL | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune = llava_setup(self.config)
        #: recent selections, for inspection and tests: per image, ascending kept indices (CPU)
        self.tokenprune_kept: deque[torch.Tensor] = deque(maxlen=256)
        self._capture: QKCapture | None = None
        if self.tokenprune is None:
            return
        info, self._prefix, _ = vision_facts(self.config)
        self._info = info
        kinds = self.tokenprune.kinds(info)
        layers = self.vision_tower.vision_model.encoder.layers
        attn = layers[0].self_attn
        gather = None
        if getattr(attn, "tp_size", 1) > 1:
            from vllm.distributed import tensor_model_parallel_all_gather
            gather = tensor_model_parallel_all_gather
        self._capture = QKCapture({j: layers[j].self_attn.qkv_proj for j in kinds}, kinds,
                                  num_heads=attn.num_heads, scale=attn.scale, gather=gather)

    def embed_multimodal(self, **kwargs: object) -> Any:
        if self.tokenprune is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("tokenprune prunes images from pixels; precomputed image_embeds are not supported "
                             "with hf_overrides['tokenprune']")
        setup, info, p = self.tokenprune, self._info, self._prefix
        if self._capture is not None and self._capture.handles:
            with self._capture.run() as box:
                feats = self._process_image_pixels(image_input)
            scores = self._capture.reduce(box)
        else:
            feats, scores = self._process_image_pixels(image_input), {}
        assert isinstance(feats, torch.Tensor)      # [n, P+N, Dv]: CLIP / SigLIP, fixed size
        cls_off = 1 if info.has_cls else 0
        sc = {key: v[:, cls_off:] for key, v in scores.items()}
        n = feats.shape[1]
        n_keep = setup.kept(n) - p
        llm_space = setup.spec.features == "llm"
        x = self.multi_modal_projector(feats) if llm_space else feats
        sels = select(setup, info, info.grid, x[:, p:], sc, n_keep)
        kept = torch.stack([apply_selection(x[i], s, p) for i, s in enumerate(sels)])
        for s in sels:
            self.tokenprune_kept.append(torch.sort(s.indices).values.cpu() + p)
        return tuple(kept if llm_space else self.multi_modal_projector(kept))
