"""A tiny Gemma 3 (``Gemma3ForConditionalGeneration``) of the real transformers classes, and its real
``Gemma3Processor``, built offline.

The model: a 3-layer SigLIP tower (112 px, 14 px patches: an 8 x 8 patch grid, no CLS) whose
projector average-pools 2 x 2 patches into a 4 x 4 grid (``mm_tokens_per_image=16``), and a 3-layer
Gemma 3 LLM mixing sliding-window and full-attention layers (``layer_types``). The processor: the
real ``Gemma3ImageProcessor`` (112 x 112 resize, pan-and-scan when asked) and a word-level tokenizer
with the special tokens the processor needs (``<start_of_image>`` = boi, ``<image_soft_token>`` =
the placeholder, ``<end_of_image>`` = eoi). Weights are random (the projector's, which transformers
initialises to zero, drawn too, so that image features differ).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

#: token ids of the tiny vocabulary (text ids are the words after them)
IDS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "image": 4, "boi": 5, "eoi": 6}
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<image_soft_token>", "<start_of_image>", "<end_of_image>"]
#: the processor's own words around pan-and-scan crops, so that they are not all unknown
PAS_WORDS = "here is the original image and are some crops to help you see better".split()
IMAGE_PX, PATCH, TOKENS = 112, 14, 16
#: the tiny LLM's sliding window: longer than the kit's one-image prompts, shorter than a
#: pan-and-scan prompt (three images), so both regimes are exercised
WINDOW = 32
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

CHAT_TEMPLATE = (
    "<bos>{% for m in messages %}{{ m['role'] }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}model : {% endif %}")


def config(*, vision_layers: int = 3, vision_hidden: int = 32, vision_heads: int = 4, llm_layers: int = 3,
           llm_hidden: int = 64, llm_heads: int = 4, llm_kv_heads: int = 2, vocab_size: int = 256,
           image_size: int = IMAGE_PX, patch_size: int = PATCH, tokens: int = TOKENS,
           sliding_window: int = WINDOW, layer_types: list[str] | None = None,
           attn_implementation: str = "sdpa"):
    """A tiny ``Gemma3Config`` (SigLIP tower without head, Gemma 3 text model)."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                                num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                image_size=image_size, patch_size=patch_size, vision_use_head=False)
    types = list(layer_types or LAYER_TYPES)[:llm_layers]
    types += [LAYER_TYPES[i % len(LAYER_TYPES)] for i in range(len(types), llm_layers)]
    text = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=llm_hidden, intermediate_size=llm_hidden * 2,
                            num_hidden_layers=llm_layers, num_attention_heads=llm_heads,
                            num_key_value_heads=llm_kv_heads, head_dim=llm_hidden // llm_heads,
                            query_pre_attn_scalar=llm_hidden // llm_heads, sliding_window=sliding_window,
                            layer_types=types, max_position_embeddings=4096, pad_token_id=IDS["pad"],
                            bos_token_id=IDS["bos"], eos_token_id=IDS["eos"])
    cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens,
                       boi_token_index=IDS["boi"], eoi_token_index=IDS["eoi"], image_token_index=IDS["image"],
                       pad_token_id=IDS["pad"], bos_token_id=IDS["bos"], eos_token_id=IDS["eos"])
    cfg._attn_implementation = attn_implementation
    return cfg


def build(dtype: torch.dtype = torch.float32, seed: int = 0, attn_implementation: str = "sdpa", **kw: Any):
    """A random tiny ``Gemma3ForConditionalGeneration`` in eval mode (vision attention sharpened, so
    that strategies disagree visibly; the projector drawn at random)."""
    from transformers import Gemma3ForConditionalGeneration

    from tokenprune.patches.llava import vision_encoder_layers

    cfg = copy.deepcopy(config(attn_implementation=attn_implementation, **kw))
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in vision_encoder_layers(model.model.vision_tower):
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn(proj.shape, generator=g).to(dtype) * 0.5)
    return model.eval()


def tokenizer():
    """A word-level fast tokenizer with Gemma 3's image tokens as named special tokens (offline)."""
    from .tiny import WORDS, word_tokenizer

    words = sorted(set(WORDS) | set(PAS_WORDS) | {"model"})
    return word_tokenizer(SPECIAL + words + list("?.,:"),
                          {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                           "eoi_token": "<end_of_image>"})


def processor(**image_kwargs: Any):
    """The real ``Gemma3Processor``: ``Gemma3ImageProcessor`` (112 x 112; pan-and-scan when a call
    passes :data:`PAN_AND_SCAN`: up to 3 crops of at least 40 px once the aspect ratio exceeds 1.2)
    and :func:`tokenizer`; 16 placeholders per image."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    kw: dict[str, Any] = {"size": {"height": IMAGE_PX, "width": IMAGE_PX}, **PAN_AND_SCAN, "do_pan_and_scan": False}
    kw.update(image_kwargs)
    return Gemma3Processor(image_processor=Gemma3ImageProcessor(**kw), tokenizer=tokenizer(),
                           chat_template=CHAT_TEMPLATE, image_seq_length=TOKENS)


#: what a call passes for pan-and-scan (the processor's own defaults win over the image
#: processor's attributes: 256 px crops at least, far beyond a tiny image)
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 40, "pan_and_scan_max_num_crops": 3,
                "pan_and_scan_min_ratio_to_activate": 1.2}

_PROC: dict[str, Any] = {}


def _proc() -> Any:
    if "p" not in _PROC:
        _PROC["p"] = processor()
    return _PROC["p"]


def random_image(h: int, w: int, seed: int = 0):
    from .tiny import random_image as draw

    return draw(h, w, seed)


def prompt(n_images: int = 1, question: str = "what is in the image") -> str:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    return _proc().apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(images: list[Any], question: str = "what is in the image", token_types: bool = True,
           **kw: Any) -> dict[str, torch.Tensor]:
    """One prompt with ``images`` (PIL) through the real processor; ``token_types=False`` drops the
    ``token_type_ids`` it returns (the model then attends causally among image tokens too)."""
    out = dict(_proc()(text=prompt(len(images), question), images=list(images), return_tensors="pt", **kw))
    out.pop("num_crops", None)
    if not token_types:
        out.pop("token_type_ids", None)
    return out


def inputs(seed: int = 0, token_types: bool = True) -> dict[str, torch.Tensor]:
    """One prompt with one image (a different random image per seed)."""
    return encode([random_image(90, 120, seed)], token_types=token_types)


def pan_and_scan_inputs(seed: int = 0, token_types: bool = True) -> dict[str, torch.Tensor]:
    """One wide image (3:1) with pan-and-scan: the processor sends the whole image and its crops as
    images of the prompt, each with its own placeholder run."""
    return encode([random_image(60, 180, seed)], token_types=token_types, **PAN_AND_SCAN)


def batch(token_types: bool = True) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two rows with different images (the second has two), left-padded by the real processor, and
    the same rows alone."""
    proc = _proc()
    imgs = [[random_image(90, 120, 1)], [random_image(120, 90, 2), random_image(100, 100, 3)]]
    texts = [prompt(len(row)) for row in imgs]
    proc.tokenizer.padding_side = "left"
    out = dict(proc(text=texts, images=imgs, return_tensors="pt", padding=True))
    out.pop("num_crops", None)
    if not token_types:
        out.pop("token_type_ids", None)
    rows = [encode(row, token_types=token_types) for row in imgs]
    return out, rows


def case(token_types: bool = False):
    """The conformance kit's case. ``token_types=False`` (the default): the processor's output
    without ``token_type_ids`` (causal attention among image tokens), which every reference of the
    kit can express; ``True``: with them (bidirectional image blocks), for which
    ``tests/test_family_gemma3.py`` gives the kit's hand-fed and second-turn references the token
    types. Either way Gemma 3's ``generate`` takes no ``inputs_embeds``, so the kit's beam test
    checks determinism only (``deepstack``); the test file checks beams against the unpatched model."""
    from tokenprune.testing import FamilyCase

    return FamilyCase(
        "gemma3" + ("_token_types" if token_types else ""),
        build=lambda dtype=torch.float32: build(dtype=dtype),
        inputs=lambda seed: inputs(seed, token_types=token_types),
        batch=lambda: batch(token_types=token_types),
        suppress=(IDS["image"], IDS["boi"], IDS["eoi"]),
        # Gemma 3's generate takes no inputs_embeds: the kit's beam ideal cannot be fed that way
        deepstack=True, extra={"positions_from_mask": True})


def save(path: str | Path, **kw: Any) -> Path:
    """Save a tiny model and its processor (``save_pretrained``) for ``tokenprune.load`` / the CLI."""
    path = Path(path)
    build(**kw).save_pretrained(path)
    processor().save_pretrained(path)
    return path
