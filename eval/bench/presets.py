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
    #: one image's size in the family's own measure (Family.bench_inputs): Qwen (h, w) patches,
    #: LLaVA-NeXT / OneVision (h, w) px; fixed-grid families ignore it
    size: tuple[int, int] | None = None
    video_frames: int | None = None        # a clip of this many frames per row instead of an image
    strategies: tuple[str, ...] | None = None   # overrides the bench's list (e.g. video methods)
    #: per-strategy parameters besides the budget (e.g. a scoring layer the family can serve)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchPreset:
    models: tuple[ModelPreset, ...]
    repeats: int
    warmup: int
    decode_tokens: int
    strategies: tuple[str, ...] = ("hiprune", "fopru", "visionzip", "fastv", "random", "pool", "divprune", "vispruner",
                                   "prumerge", "dart", "pdrop", "sparsevlm", "cdpruner")
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


def _mid_anyres(kind: str):
    def make():
        from ..tiny import anyres_config

        # 168 px crops of 12 x 12 patches (144 tokens per crop); pinpoints up to 2 x 2 crops
        return anyres_config(kind, vision_layers=8, vision_hidden=256, vision_heads=8, llm_layers=8, llm_hidden=512,
                             llm_heads=8, llm_kv_heads=8, vocab_size=1024, crop=168,
                             pinpoints=[[168, 336], [336, 168], [336, 336]])
    return make


def _tiny_anyres(kind: str):
    def make():
        from ..tiny import anyres_config

        return anyres_config(kind)
    return make


def _mid_ov_video():
    from ..tiny import anyres_config

    # 168 px frames: 12 x 12 patches pooled to 6 x 6 = 36 tokens per frame
    return anyres_config("llava_onevision", vision_layers=8, vision_hidden=256, vision_heads=8, llm_layers=8,
                         llm_hidden=512, llm_heads=8, llm_kv_heads=8, vocab_size=1024, crop=168,
                         pinpoints=[[168, 168]])


def _tiny_qwen(kind: str):
    def make():
        from ..tiny import qwen_config

        return qwen_config(kind)
    return make


def llava_next_7b_config():
    """LLaVA-NeXT-7B (vicuna): CLIP ViT-L/14-336 + Llama-2-7B, anyres up to 2 x 2 / 1 x 3 crops."""
    from transformers import LlavaNextConfig

    base = llava15_7b_config()
    return LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config, image_token_id=32000,
                           image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                           vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0)


def qwen25_vl_7b_config():
    """Qwen2.5-VL-7B: 32-block window-attention ViT (1280 wide) + Qwen2.5-7B (28 layers, 3584)."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=32, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], in_channels=3)
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653)


def llava_onevision_7b_config():
    """LLaVA-OneVision-7B: SigLIP-so400m/14-384 (the checkpoint keeps 26 of its 27 layers, 1152 wide) +
    Qwen2-7B (28 layers, 3584); a video frame is 27 x 27 patches pooled (bilinear) to 14 x 14 = 196 tokens."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14)
    text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)
    pins = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=151646,
                                video_token_id=151647, image_grid_pinpoints=pins, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")


def _mid_qwen3_5():
    """Qwen3.5 at the CPU preset's mid size: the released layer pattern (three Gated-DeltaNet layers,
    then one full-attention layer) over 8 layers of 512, and a 16 px tower of 8 x 256."""
    from transformers import Qwen3_5Config

    types = ["linear_attention"] * 3 + ["full_attention"]
    text = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
                layer_types=types * 2)
    vision = dict(depth=8, hidden_size=256, out_hidden_size=512, intermediate_size=1024, num_heads=8,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=1024)
    # small special ids (the bench's random text is drawn from 10 up)
    return Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=4, video_token_id=5,
                         vision_start_token_id=6, vision_end_token_id=7)


def qwen3_5_config():
    """Qwen3.5 at transformers' default ``Qwen3_5Config`` geometry: a 27-block SigLIP-style 16 px tower
    (1152 wide) + a 32-layer hybrid LLM of 4096 (three Gated-DeltaNet layers per full-attention
    layer, 16 heads of 256 with 4 kv heads); the merger's output widened to the LLM's 4096."""
    from transformers import Qwen3_5Config

    cfg = Qwen3_5Config()
    cfg.vision_config.out_hidden_size = cfg.text_config.hidden_size
    return cfg


def _mid_internvl():
    """InternVL at mid size: 224 px tiles of 14 px patches (16 x 16, pixel-shuffled to 8 x 8 = 64 tokens
    a tile), an 8 x 256 InternViT and a Qwen2 LLM of 8 x 512."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                                  image_size=224, patch_size=14)
    text = Qwen2Config(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=1024, max_position_embeddings=8192)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=4, image_seq_length=64,
                          downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")


def internvl3_8b_config():
    """InternVL3-8B (``-hf`` format): InternViT-300M (24 layers, 1024 wide, 448 px tiles of 14 px, 256 LLM
    tokens a tile after the 2 x 2 pixel shuffle) + Qwen2.5-7B (28 layers, 3584, 4 kv heads)."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=448, patch_size=14, layer_scale_init_value=0.1)
    text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=False)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667, image_seq_length=256,
                          downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", tie_word_embeddings=False)


def _mid_gemma3():
    """Gemma 3 at mid size: a 448 px SigLIP tower of 14 px patches (32 x 32, average-pooled 2 x 2 to the
    fixed 256 tokens an image), 8 x 256; a Gemma 3 LLM of 8 x 512 with its 5 sliding : 1 full pattern."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                                image_size=448, patch_size=14, vision_use_head=False)
    types = (["sliding_attention"] * 5 + ["full_attention"]) * 2
    text = Gemma3TextConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64,
                            sliding_window=512, layer_types=types[:8], max_position_embeddings=8192)
    return Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=256, image_token_index=4,
                        boi_token_index=5, eoi_token_index=6)


def gemma3_4b_config():
    """Gemma-3-4B: SigLIP-so400m/14 at 896 px (27 layers, 1152 wide, 64 x 64 patches pooled 4 x 4 to 256
    tokens an image) + a 34-layer Gemma 3 LLM of 2560 (8 heads of 256, 4 kv; 5 sliding-window layers of
    1024 per full-attention layer)."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=896, patch_size=14, vision_use_head=False)
    types = [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(34)]
    text = Gemma3TextConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=1024, layer_types=types, max_position_embeddings=131072,
                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                "rope_theta": 1000000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    return Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=256, image_token_index=262144,
                        boi_token_index=255999, eoi_token_index=256000)


#: what Gemma 3 serves: vision-stage methods (inner-LLM stages are refused: its sliding-window masks)
GEMMA3_STRATEGIES = ("hiprune", "fopru", "visionzip", "random", "pool", "divprune", "vispruner", "prumerge",
                     "cdpruner")
#: Qwen3.5: inner methods score on a full-attention layer; the first is layer 3, so K >= 4
QWEN3_5_OPTIONS: dict[str, dict[str, Any]] = {"fastv": {"layer": 4}, "dart": {"layer": 4}}


VIDEO_STRATEGIES = ("holitom", "evs", "hiprune", "visionzip", "fastv", "random", "pool")

PRESETS: dict[str, BenchPreset] = {
    "tiny": BenchPreset(
        models=(ModelPreset("llava-tiny", "llava", _tiny_llava, batches=(1, 2), budgets=(16, 4), text_tokens=8),
                ModelPreset("qwen2.5-vl-tiny", "qwen2_5_vl", _tiny_qwen("qwen2_5_vl"), batches=(1,),
                            budgets=(8,), text_tokens=8, size=(8, 12)),
                ModelPreset("llava-ov-tiny", "llava_onevision", _tiny_anyres("llava_onevision"), batches=(1,),
                            budgets=(8,), text_tokens=8, size=(84, 112)),
                ModelPreset("llava-ov-tiny video", "llava_onevision", _tiny_anyres("llava_onevision"),
                            batches=(1,), budgets=(12,), text_tokens=8, video_frames=4,
                            strategies=("holitom", "fastv"))),
        # 3 repeats: a median of 2 is their mean, which one disturbed repeat drags along
        repeats=3, warmup=1, decode_tokens=4, capture_batch=2),
    "cpu": BenchPreset(
        models=(ModelPreset("llava-mid (576 tok)", "llava", _mid_llava, batches=(1, 4), budgets=(192, 64)),
                # 448 x 448 px (32 x 32 patches of 14 px) -> 256 merged tokens
                ModelPreset("qwen2-vl-mid (256 tok)", "qwen2_vl", _mid_qwen("qwen2_vl"), batches=(1, 4),
                            budgets=(85, 28), size=(32, 32)),
                ModelPreset("qwen2.5-vl-mid (256 tok)", "qwen2_5_vl", _mid_qwen("qwen2_5_vl"), batches=(1, 4),
                            budgets=(85, 28), size=(32, 32)),
                # anyres: a 336 x 252 px image -> base 144 + unpadded 2 x 2 canvas with newlines
                ModelPreset("llava-next-mid (anyres)", "llava_next", _mid_anyres("llava_next"), batches=(1, 4),
                            budgets=(120, 40), size=(252, 336)),
                ModelPreset("llava-ov-mid (anyres)", "llava_onevision", _mid_anyres("llava_onevision"),
                            batches=(1, 4), budgets=(120, 40), size=(252, 336)),
                # Qwen3-VL: 16 px patches, 512 x 512 px -> 256 merged tokens
                ModelPreset("qwen3-vl-mid (256 tok)", "qwen3_vl", _mid_qwen("qwen3_vl"), batches=(1, 4),
                            budgets=(85, 28), size=(32, 32)),
                # 16 frames x 36 pooled tokens (+ 1 newline) = 577 placeholders; keep 20 % / 10 %
                ModelPreset("llava-ov-mid video (16 fr)", "llava_onevision", _mid_ov_video, batches=(1,),
                            budgets=(115, 58), video_frames=16, strategies=VIDEO_STRATEGIES),
                # 512 x 512 px (32 x 32 patches of 16 px) -> 256 merged tokens
                ModelPreset("qwen3.5-mid (256 tok)", "qwen3_5", _mid_qwen3_5, batches=(1, 4), budgets=(85, 28),
                            size=(32, 32), options=QWEN3_5_OPTIONS),
                # 448 x 448 px -> 2 x 2 tiles + thumbnail = 5 tiles x 64 tokens
                ModelPreset("internvl-mid (5 tiles)", "internvl", _mid_internvl, batches=(1, 4), budgets=(105, 35),
                            size=(448, 448)),
                ModelPreset("gemma3-mid (256 tok)", "gemma3", _mid_gemma3, batches=(1, 4), budgets=(85, 28),
                            strategies=GEMMA3_STRATEGIES)),
        repeats=5, warmup=1, decode_tokens=8, capture_batch=8),
    "gpu": BenchPreset(
        models=(# 672 x 672 px: 5 crops -> 2,928 placeholders (576 base + 48 x 48 canvas + 48 newlines)
                ModelPreset("llava-next-7b (anyres)", "llava_next", llava_next_7b_config, batches=(1,),
                            budgets=(640, 320, 160), dtype=torch.bfloat16, size=(672, 672)),
                # 1008 x 1008 px: 72 x 72 patches -> 1,296 tokens; 33 / 22 / 11 %
                ModelPreset("qwen2.5-vl-7b (1008 px)", "qwen2_5_vl", qwen25_vl_7b_config, batches=(1,),
                            budgets=(432, 288, 144), dtype=torch.bfloat16, size=(72, 72)),
                # 32 frames x 196 pooled tokens + 1 newline = 6,273 placeholders; keep 20 % / 10 %
                ModelPreset("llava-ov-7b video (32 fr)", "llava_onevision", llava_onevision_7b_config,
                            batches=(1,), budgets=(1254, 627), dtype=torch.bfloat16, video_frames=32,
                            strategies=VIDEO_STRATEGIES),
                ModelPreset("llava-1.5-7b", "llava", llava15_7b_config, batches=(1, 16),
                            budgets=(192, 128, 64), dtype=torch.bfloat16),
                # 1024 x 1024 px: 64 x 64 patches of 16 px -> 1,024 tokens; 33 / 22 / 11 %
                ModelPreset("qwen3.5 (4096 x 32, 1024 px)", "qwen3_5", qwen3_5_config, batches=(1,),
                            budgets=(338, 225, 113), dtype=torch.bfloat16, size=(64, 64), options=QWEN3_5_OPTIONS),
                # 896 x 896 px: 2 x 2 tiles + thumbnail = 5 x 256 = 1,280 tokens
                ModelPreset("internvl3-8b (5 tiles)", "internvl", internvl3_8b_config, batches=(1,),
                            budgets=(425, 285, 140), dtype=torch.bfloat16, size=(896, 896)),
                ModelPreset("gemma-3-4b (256 tok)", "gemma3", gemma3_4b_config, batches=(1, 16),
                            budgets=(85, 56, 28), dtype=torch.bfloat16, strategies=GEMMA3_STRATEGIES)),
        repeats=7, warmup=2, decode_tokens=16, capture_batch=8),
}


def build(preset: ModelPreset, device: str):
    """The preset's model on ``device`` in eval mode (config deep-copied: never shared)."""
    from transformers import AutoModelForImageTextToText

    cfg = copy.deepcopy(preset.config())
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=preset.dtype, attn_implementation="sdpa")
    return model.eval()
