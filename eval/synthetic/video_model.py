"""The tiny video VLM's definition (a real ``LlavaOnevisionForConditionalGeneration`` with a SigLIP
tower and a Qwen2 LLM), its word-level tokenizer and its real processor: shared by the trainer
(:mod:`.train_video`) and the image-to-video transfer (:mod:`.transfer`)."""
from __future__ import annotations

import copy
from typing import Any

import torch

from .clips import VIDEO_WORDS
from .questions import VOCAB
from .scenes import IMAGE_SIZE, PATCH

SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", "<image>", "<video>"]
CHAT_WORDS = ("user", "assistant")
WORDS = tuple(dict.fromkeys(list(VOCAB) + VIDEO_WORDS + ["end"]))
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
POOLED = (IMAGE_SIZE // PATCH + 1) // 2            # 8: the 16 x 16 grid pooled 2x per frame
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def video_config(vision_layers: int = 6, vision_hidden: int = 128, llm_layers: int = 4, llm_hidden: int = 256):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4,
                                num_hidden_layers=vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                                patch_size=PATCH)
    text = Qwen2Config(hidden_size=llm_hidden, intermediate_size=llm_hidden * 3, num_hidden_layers=llm_layers,
                       num_attention_heads=8, num_key_value_heads=4,
                       vocab_size=len(SPECIAL) + len(CHAT_WORDS) + len(WORDS), max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=SPECIAL.index("<image>"),
                                video_token_id=SPECIAL.index("<video>"), image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                vision_aspect_ratio="anyres_max_9", pad_token_id=0)


def build_model(seed: int = 0, device: str = "cpu", **kw: Any):
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        return LlavaOnevisionForConditionalGeneration._from_config(copy.deepcopy(video_config(**kw)),
                                                                   attn_implementation="sdpa")


def build_tokenizer():
    from ..tiny import word_tokenizer

    return word_tokenizer(SPECIAL + list(CHAT_WORDS) + list(WORDS), {"image_token": "<image>", "video_token": "<video>"},
                          whitespace_split=True)


def build_processor():
    """A real ``LlavaOnevisionProcessor`` (224 px, SigLIP normalisation) + the word-level tokenizer."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ip = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
                                      image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    vp = LlavaOnevisionVideoProcessor(size=size, image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    side = IMAGE_SIZE // PATCH
    return LlavaOnevisionProcessor(image_processor=ip, video_processor=vp, tokenizer=build_tokenizer(),
                                   num_image_tokens=side * side, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9", chat_template=CHAT_TEMPLATE)
