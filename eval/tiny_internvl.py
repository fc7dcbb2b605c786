"""A tiny InternVL (``InternVLForConditionalGeneration``, model_type ``internvl``) of the real classes,
built offline: an InternViT-style tower (CLS + 8 x 8 patches of 7 px per 56 px tile), pixel shuffle
0.5 (16 LLM tokens per tile), a Qwen2 LLM; its real processor (``InternVLProcessor`` with the
``GotOcr2ImageProcessor`` cropping images into tiles plus a thumbnail, and ``InternVLVideoProcessor``)
over a word-level tokenizer carrying ``<IMG_CONTEXT>``, ``<img>``, ``</img>`` and ``<video>``.

Used by ``tests/test_family_internvl.py`` (``case()`` feeds the conformance kit). Weights are random.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .tiny import WORDS, batch_prompts, random_image, random_video, word_tokenizer

TILE = 56                 #: tile side in px (the vision config's image_size)
PATCH = 7                 #: 8 x 8 patches per tile -> 4 x 4 LLM tokens after the 2 x 2 pixel shuffle
TOKENS_PER_TILE = (TILE // PATCH // 2) ** 2
MAX_TILES = 4             #: the image processor's max_patches (the real default is 12)
#: token ids of the tiny vocabulary (text ids are drawn from 10 up)
IDS = {"context": 4, "start": 5, "end": 6, "video": 7}
SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", "<IMG_CONTEXT>", "<img>", "</img>", "<video>"]
FRAME_WORDS = [f"Frame{i}" for i in range(1, 9)]      # the processor writes "Frame1: <img>...</img>" per frame

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT> {% elif c['type'] == 'video' %}<video> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def config(*, vision_layers: int = 3, vision_hidden: int = 32, vision_heads: int = 4, llm_layers: int = 3,
           llm_hidden: int = 64, llm_heads: int = 4, llm_kv_heads: int = 2, vocab_size: int = 256,
           qk_norm: bool = False, feature_layer: int = -1, attn_implementation: str = "sdpa"):
    """An ``InternVLConfig``: InternViT tower (CLS dropped, ``vision_feature_select_strategy="default"``)
    and a Qwen2 LLM (InternVL3's)."""
    import transformers as tf

    vision = tf.InternVLVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=TILE, patch_size=PATCH, use_qk_norm=qk_norm)
    text = tf.Qwen2Config(
        hidden_size=llm_hidden, intermediate_size=llm_hidden * 2, num_hidden_layers=llm_layers,
        num_attention_heads=llm_heads, num_key_value_heads=llm_kv_heads, vocab_size=vocab_size,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IDS["context"],
                            image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5,
                            vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
                            tie_word_embeddings=False)   # untied: a tiny random LLM then does not echo its input
    cfg._attn_implementation = attn_implementation
    return cfg


def build(dtype: torch.dtype = torch.float32, seed: int = 0, attn_implementation: str = "sdpa", **kw: Any):
    """A random tiny ``InternVLForConditionalGeneration`` in eval mode, vision attention sharpened
    (random init gives near-uniform attention, under which every strategy agrees)."""
    from transformers import InternVLForConditionalGeneration

    cfg = copy.deepcopy(config(attn_implementation=attn_implementation, **kw))
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_proj.weight.mul_(4.0)
            layer.attention.k_proj.weight.mul_(4.0)
            layer.lambda_1.fill_(1.0)         # the real towers' layer scales are trained, not 0.1
            layer.lambda_2.fill_(1.0)
        # zero-initialised position embeddings and CLS: give the tower something to attend by
        emb = model.model.vision_tower.embeddings
        emb.position_embeddings.normal_(0.0, 0.5)
        emb.cls_token.normal_(0.0, 0.5)
    return model.eval()


def build_tokenizer():
    """Word-level fast tokenizer with the special tokens ``InternVLProcessor`` reads by name."""
    special = {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
               "end_image_token": "</img>", "video_token": "<video>"}
    return word_tokenizer(SPECIAL + sorted(set(WORDS)) + FRAME_WORDS + list("?.,:"), special)


def build_processor(max_tiles: int = MAX_TILES):
    """The real ``InternVLProcessor``: tiles of ``TILE`` px (+ a thumbnail when there are several),
    video frames resized to one tile each."""
    import transformers as tf

    ip = tf.GotOcr2ImageProcessor(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                  max_patches=max_tiles)
    vp = tf.InternVLVideoProcessor(size={"height": TILE, "width": TILE})
    return tf.InternVLProcessor(image_processor=ip, tokenizer=build_tokenizer(), video_processor=vp,
                                image_seq_length=TOKENS_PER_TILE, chat_template=CHAT_TEMPLATE)


_PROCESSOR: list[Any] = []


def processor():
    """One shared processor (building it costs more than a call)."""
    if not _PROCESSOR:
        _PROCESSOR.append(build_processor())
    return _PROCESSOR[0]


def prompt(proc: Any, n_images: int = 1, n_videos: int = 0, question: str = "what is in the image") -> str:
    content = ([{"type": "image"} for _ in range(n_images)] + [{"type": "video"} for _ in range(n_videos)]
               + [{"type": "text", "text": question}])
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(images: list[Any] = (), videos: list[Any] = (), question: str = "what is in the image",
           proc: Any = None) -> dict[str, torch.Tensor]:
    """One prompt through the real processor: ``images`` (PIL), then ``videos`` ((T, H, W, 3) uint8)."""
    proc = proc or processor()
    kw: dict[str, Any] = {"text": prompt(proc, len(images), len(videos), question), "return_tensors": "pt"}
    if images:
        kw["images"] = list(images)
    if videos:
        kw["videos"] = list(videos)
    return dict(proc(**kw))


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """A 2:1 image (2 x 1 tiles + thumbnail: 3 tiles, 48 tokens) and a 2-frame video (2 one-tile
    frames, 32 tokens), as the processor feeds them: every tile and frame in ``pixel_values``."""
    return encode(images=[random_image(TILE, 2 * TILE, seed)], videos=[random_video(2, 60, 60, seed + 7)])


def batch() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two left-padded rows with different images (3 tiles; a tall 1 x 3 + thumbnail and a one-tile
    square image), and the same rows alone."""
    imgs = [[random_image(TILE, 2 * TILE, 1)], [random_image(150, 60, 2), random_image(TILE, TILE, 3)]]
    rows = [encode(images=im) for im in imgs]
    ids, mask = batch_prompts([r["input_ids"] for r in rows])
    return ({"input_ids": ids, "attention_mask": mask,
             "pixel_values": torch.cat([r["pixel_values"] for r in rows])}, rows)


def case():
    """The conformance kit's case for this family."""
    from tokenprune.testing import FamilyCase

    return FamilyCase("internvl", build=lambda dtype=torch.float32: build(dtype=dtype), inputs=inputs, batch=batch,
                      suppress=tuple(IDS.values()), extra={"positions_from_mask": True})


def save(path: Any, **kw: Any) -> Any:
    """Save a tiny model and its processor to ``path`` (``save_pretrained``), for ``tokenprune.load``."""
    build(**kw).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path
