"""The tiny LLaVA of the real classes trained on the synthetic VQA, and its offline processor."""
from __future__ import annotations

import copy

import torch

from ..tiny import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL
from .questions import VOCAB
from .scenes import IMAGE_SIZE, PATCH

CHAT_WORDS = ("user", "assistant")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vqa_config():
    """CLIP-style tower (224 px / 14 -> 16x16 patches + CLS, 6 x 128) + Llama LLM (4 x 256, GQA)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = len(SPECIAL) + len(CHAT_WORDS) + len(VOCAB)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128)
    text = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=SPECIAL.index(IMAGE_TOKEN),
                       vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0)


def build_model(seed: int = 0, device: str = "cpu"):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        return LlavaForConditionalGeneration._from_config(copy.deepcopy(vqa_config()), attn_implementation="sdpa")


def build_tokenizer():
    from ..tiny import word_tokenizer

    return word_tokenizer(SPECIAL + list(CHAT_WORDS) + list(VOCAB), {"image_token": IMAGE_TOKEN}, whitespace_split=True)


def build_processor():
    """A real ``LlavaProcessor``: CLIP image processor at 224 px + the word-level tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=ip, tokenizer=build_tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def prompt_text(question: str) -> str:
    """The chat-template text of one question (what ``apply_chat_template`` produces)."""
    return f"user : {IMAGE_TOKEN} {question} assistant : "


def normalise(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, 224, 224] in [0, 1] -> CLIP-normalised pixel values (what the processor does)."""
    mean = torch.tensor(CLIP_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=images.device)[:, None, None]
    return (images - mean) / std
