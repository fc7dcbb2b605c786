"""Model geometries for the benchmark, built from configs with random weights.

Timing does not depend on weight values, so real-size architectures need no download.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class ModelPreset:
    """One model geometry and the grid of cases run on it."""

    name: str
    family: str
    config: Callable[[], Any]
    batches: tuple[int, ...]
    budgets: tuple[int, ...]           # visual tokens kept per image
    text_tokens: int = 64              # prompt text around the image
    dtype: torch.dtype = torch.float32
    image: tuple[int, int] | None = None   # Qwen families: image size in patches (h, w)


@dataclass(frozen=True)
class BenchPreset:
    models: tuple[ModelPreset, ...]
    repeats: int
    warmup: int
    decode_tokens: int
    strategies: tuple[str, ...] = ("hiprune", "fopru", "visionzip", "fastv", "random", "pool")
    reference: tuple[str, ...] = ("hiprune", "fopru", "visionzip")
    capture_batch: int | None = None   # extra vision-only batch for the capture-overhead goal
    extra: dict[str, Any] = field(default_factory=dict)


def _tiny_llava():
    from ..tiny import llava_config

    return llava_config(image_size=112, vision_layers=4, llm_layers=3)


def _mid_llava():
    from ..tiny import mid_llava_config

    return mid_llava_config()


def llava15_7b_config():
    """LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, 577 tokens) + Llama-2-7B (32 layers, 4096)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0)


def _mid_qwen(kind: str):
    def make():
        from ..tiny import qwen_config

        return qwen_config(kind, vision_layers=8, vision_hidden=256, vision_heads=8, llm_layers=8,
                           llm_hidden=512, llm_heads=8, llm_kv_heads=8, vocab_size=1024)
    return make


def _tiny_qwen(kind: str):
    def make():
        from ..tiny import qwen_config

        return qwen_config(kind)
    return make


PRESETS: dict[str, BenchPreset] = {
    "tiny": BenchPreset(
        models=(ModelPreset("llava-tiny", "llava", _tiny_llava, batches=(1, 2), budgets=(16, 4), text_tokens=8),
                ModelPreset("qwen2.5-vl-tiny", "qwen2_5_vl", _tiny_qwen("qwen2_5_vl"), batches=(1,),
                            budgets=(8,), text_tokens=8, image=(8, 12))),
        repeats=2, warmup=1, decode_tokens=3, capture_batch=2),
    "cpu": BenchPreset(
        models=(ModelPreset("llava-mid (576 tok)", "llava", _mid_llava, batches=(1, 4), budgets=(192, 64)),
                # 448 x 448 px (32 x 32 patches of 14 px) -> 256 merged tokens
                ModelPreset("qwen2-vl-mid (256 tok)", "qwen2_vl", _mid_qwen("qwen2_vl"), batches=(1, 4),
                            budgets=(85, 28), image=(32, 32)),
                ModelPreset("qwen2.5-vl-mid (256 tok)", "qwen2_5_vl", _mid_qwen("qwen2_5_vl"), batches=(1, 4),
                            budgets=(85, 28), image=(32, 32)),
                # Qwen3-VL: 16 px patches, 512 x 512 px -> 256 merged tokens
                ModelPreset("qwen3-vl-mid (256 tok)", "qwen3_vl", _mid_qwen("qwen3_vl"), batches=(1, 4),
                            budgets=(85, 28), image=(32, 32))),
        repeats=5, warmup=1, decode_tokens=8, capture_batch=8),
    "gpu": BenchPreset(
        models=(ModelPreset("llava-1.5-7b", "llava", llava15_7b_config, batches=(1, 16),
                            budgets=(192, 128, 64), dtype=torch.bfloat16),),
        repeats=10, warmup=3, decode_tokens=16, capture_batch=8),
}


def build(preset: ModelPreset, device: str):
    """The preset's model on ``device`` in eval mode (config deep-copied: never shared)."""
    from transformers import AutoModelForImageTextToText

    cfg = copy.deepcopy(preset.config())
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=preset.dtype, attn_implementation="sdpa")
    return model.eval()
