"""Tiny and mid-size LLaVA-1.5 models of the real transformers classes, built offline from configs.

Used by the tests, the micro-benchmark and the embedded default checkpoint. Weights are random
unless a trained checkpoint is loaded.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

IMAGE_TOKEN = "<image>"
SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", IMAGE_TOKEN]
WORDS = ("user assistant what is in the image describe colour color shape red green blue yellow circle "
         "square triangle left right how many one two three four yes no a an of on there picture this "
         "object objects count big small is are").split()


def llava_config(*, image_size: int = 112, patch_size: int = 14, vision_layers: int = 4,
                 vision_hidden: int = 32, vision_heads: int = 4, llm_layers: int = 3,
                 llm_hidden: int = 64, llm_heads: int = 4, llm_kv_heads: int = 2,
                 vocab_size: int = 256, image_token_id: int = 4, select_strategy: str = "default",
                 feature_layer: int = -2, attn_implementation: str = "sdpa"):
    """A LlavaConfig with a CLIP vision tower and a Llama LLM; (image_size/patch_size)^2 tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 4, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(
        hidden_size=llm_hidden, intermediate_size=llm_hidden * 2, num_hidden_layers=llm_layers,
        num_attention_heads=llm_heads, num_key_value_heads=llm_kv_heads, vocab_size=vocab_size,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                      vision_feature_layer=feature_layer, vision_feature_select_strategy=select_strategy,
                      pad_token_id=0)
    cfg._attn_implementation = attn_implementation
    return cfg


def build_llava(seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                **kw: Any):
    """A random tiny ``LlavaForConditionalGeneration`` in eval mode (config deep-copied: never shared)."""
    from transformers import LlavaForConditionalGeneration

    cfg = copy.deepcopy(llava_config(attn_implementation=attn_implementation, **kw))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation,
                                                       dtype=dtype)
    # random init gives near-uniform attention; sharpen it so that strategies disagree visibly
    with torch.no_grad():
        for layer in model.model.vision_tower.vision_model.encoder.layers if hasattr(
                model.model.vision_tower, "vision_model") else model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model.eval()


def mid_llava_config(**kw: Any):
    """Mid-size LLaVA-1.5 shape for CPU benchmarks: 336 px / 14 = 576 visual tokens."""
    base = dict(image_size=336, patch_size=14, vision_layers=12, vision_hidden=256, vision_heads=8,
                llm_layers=8, llm_hidden=512, llm_heads=8, llm_kv_heads=8, vocab_size=1024)
    base.update(kw)
    return llava_config(**base)


def word_tokenizer(tokens: list[str], special: dict[str, str], whitespace_split: bool = False):
    """A word-level fast tokenizer over ``tokens`` (ids in that order; the first four are pad, bos,
    eos, unk), with ``special`` (e.g. ``{"image_token": "<image>"}``) as single special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[3]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if whitespace_split else pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=tokens[0], bos_token=tokens[1],
                                   eos_token=tokens[2], unk_token=tokens[3], padding_side="left",
                                   extra_special_tokens=dict(special))
    fast.add_special_tokens({"additional_special_tokens": list(special.values())})
    return fast


def build_tokenizer():
    """Word-level fast tokenizer with ``<image>`` as one special token (offline)."""
    return word_tokenizer(SPECIAL + sorted(set(WORDS)) + list("?.,:"), {"image_token": IMAGE_TOKEN})


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def build_processor(image_size: int = 112, patch_size: int = 14):
    """A real ``LlavaProcessor`` (CLIP image processor + the word-level tokenizer)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": image_size},
                            crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=build_tokenizer(), patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def prompt_ids(n_image_tokens: int, *, n_images: int = 1, prefix: int = 3, suffix: int = 4,
               pad: int = 0, image_token_id: int = 4, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    """One left-padded prompt [1, L]: pads, bos, text, (image run + text) per image, text."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(10, vocab, (n,), generator=g)  # noqa: E731
    parts = [torch.zeros(pad, dtype=torch.long), torch.tensor([1]), text(prefix)]
    for _ in range(n_images):
        parts += [torch.full((n_image_tokens,), image_token_id), text(2)]
    parts.append(text(suffix))
    return torch.cat(parts)[None]


def placeholder_batch(n: int, token_id: int, batch: int, text_tokens: int, vocab: int,
                      pixel_shape: tuple[int, ...], pixel_key: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """``batch`` equal rows of text around ``n`` placeholders of ``token_id`` and random pixels
    [batch, *pixel_shape] under ``pixel_key`` (the bench's LLaVA-style inputs)."""
    ids = prompt_ids(n, prefix=text_tokens // 2, suffix=text_tokens - text_tokens // 2, image_token_id=token_id,
                     vocab=min(vocab, 1024)).repeat(batch, 1)
    px = torch.randn(batch, *pixel_shape, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), pixel_key: px}


def batch_prompts(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of [1, L_i] prompts -> (input_ids [B, L], attention_mask [B, L])."""
    length = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - p.shape[1]:] = p[0]
        mask[i, length - p.shape[1]:] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL / Qwen3-VL
# ----------------------------------------------------------------------------------------------

QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: token ids of the tiny Qwen vocabularies (text ids are drawn from 10..vocab)
QWEN_IDS = {"image": 4, "video": 5, "vision_start": 6, "vision_end": 7}


def qwen_config(kind: str = "qwen2_vl", *, vision_layers: int = 4, vision_hidden: int = 32,
                vision_heads: int = 4, llm_layers: int = 3, llm_hidden: int = 64, llm_heads: int = 4,
                llm_kv_heads: int = 2, vocab_size: int = 256):
    """A tiny config of one Qwen VL family (patch 14, or 16 for Qwen3; 2x2 merge; M-RoPE)."""
    import transformers as tf

    head_dim = llm_hidden // llm_heads
    half = head_dim // 2
    text = dict(hidden_size=llm_hidden, intermediate_size=llm_hidden * 2, num_hidden_layers=llm_layers,
                num_attention_heads=llm_heads, num_key_value_heads=llm_kv_heads, vocab_size=vocab_size,
                max_position_embeddings=4096, rms_norm_eps=1e-6, head_dim=head_dim,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ids = dict(image_token_id=QWEN_IDS["image"], video_token_id=QWEN_IDS["video"],
               vision_start_token_id=QWEN_IDS["vision_start"], vision_end_token_id=QWEN_IDS["vision_end"])
    if kind == "qwen2_vl":
        vision = dict(depth=vision_layers, embed_dim=vision_hidden, hidden_size=llm_hidden,
                      num_heads=vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        return tf.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
    if kind == "qwen2_5_vl":
        vision = dict(depth=vision_layers, hidden_size=vision_hidden, out_hidden_size=llm_hidden,
                      intermediate_size=vision_hidden * 2, num_heads=vision_heads, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                      fullatt_block_indexes=[1, vision_layers - 1])
        return tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    if kind == "qwen3_vl":
        vision = dict(depth=vision_layers, hidden_size=vision_hidden, out_hidden_size=llm_hidden,
                      intermediate_size=vision_hidden * 2, num_heads=vision_heads, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        text["rope_parameters"]["mrope_interleaved"] = True
        return tf.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
    raise ValueError(f"unknown Qwen kind {kind!r}; one of {QWEN_KINDS}")


def build_qwen(kind: str = "qwen2_vl", seed: int = 0, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa", **kw: Any):
    """A random tiny Qwen VL model of the real class, in eval mode, vision attention sharpened."""
    import transformers as tf

    cls = {"qwen2_vl": tf.Qwen2VLForConditionalGeneration, "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": tf.Qwen3VLForConditionalGeneration}[kind]
    cfg = qwen_config(kind, **kw)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    with torch.no_grad():
        for blk in model.model.visual.blocks:
            d = blk.attn.qkv.out_features // 3
            blk.attn.qkv.weight[: 2 * d].mul_(4.0)   # q and k rows
    return model.eval()


def qwen_patch(kind: str) -> int:
    return 16 if kind == "qwen3_vl" else 14


def qwen_visual(kind: str, grids: list[tuple[int, int, int]], seed: int = 0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flattened patches [sum t*h*w, 3*2*p*p] and grid_thw [n, 3] (h, w in patches)."""
    p = qwen_patch(kind)
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * p * p, generator=g).to(dtype), torch.tensor(grids, dtype=torch.long)


def qwen_prompt(items: list[tuple[str, int]], seed: int = 0, vocab: int = 256,
                frames: list[int] | None = None) -> torch.Tensor:
    """[1, L] ids: bos, text, then per (modality, n_tokens) item <start> pads <end> text, text.
    ``frames``: for Qwen3 videos, split a video's pads into this many runs with text between
    (as its processor does with timestamps)."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(10, vocab, (n,), generator=g)  # noqa: E731
    parts = [torch.tensor([1]), text(3)]
    fr = iter(frames or [])
    for modality, n in items:
        tid = QWEN_IDS[modality]
        runs = next(fr, 1) if modality == "video" else 1
        for _ in range(runs):
            if runs > 1:
                parts.append(text(2))
            parts += [torch.tensor([QWEN_IDS["vision_start"]]), torch.full((n // runs,), tid),
                      torch.tensor([QWEN_IDS["vision_end"]])]
        parts.append(text(2))
    parts.append(text(4))
    return torch.cat(parts)[None]


def mm_token_type_ids(ids: torch.Tensor) -> torch.Tensor:
    """0 text, 1 image, 2 video (what Qwen processors return and ``get_rope_index`` needs)."""
    return (ids == QWEN_IDS["image"]).long() + 2 * (ids == QWEN_IDS["video"]).long()


def qwen_inputs(kind: str, images: list[tuple[int, int]] = (), videos: list[tuple[int, int, int]] = (),
                seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One prompt's model inputs: ``images`` as (h, w) patches, ``videos`` as (t, h, w)
    (t temporal patches of 2 frames); all sides even (2x2 merge)."""
    items = [("image", h * w // 4) for h, w in images] + [("video", t * h * w // 4) for t, h, w in videos]
    frames = [t for t, _, _ in videos] if kind == "qwen3_vl" else None
    ids = qwen_prompt(items, seed=seed, frames=frames)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm_token_type_ids(ids)}
    if images:
        out["pixel_values"], out["image_grid_thw"] = qwen_visual(kind, [(1, h, w) for h, w in images], seed, dtype)
    if videos:
        out["pixel_values_videos"], out["video_grid_thw"] = qwen_visual(kind, list(videos), seed + 1, dtype)
    return out


def qwen_batch(kind: str, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Left-pad several :func:`qwen_inputs` into one batch (visual tensors concatenated in order)."""
    ids, mask = batch_prompts([r["input_ids"] for r in rows])
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm_token_type_ids(ids) * mask}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        got = [r[key] for r in rows if key in r]
        if got:
            out[key] = torch.cat(got)
    return out


QWEN_SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                "<|vision_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def build_qwen_tokenizer():
    """Word-level fast tokenizer whose special ids match :data:`QWEN_IDS` (offline)."""
    return word_tokenizer(QWEN_SPECIAL + sorted(set(WORDS)) + list("?.,:"),
                          {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                           "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def build_qwen_processor(kind: str = "qwen2_vl", min_pixels: int = 56 * 56, max_pixels: int = 224 * 224):
    """The real processor of a Qwen family (image + video processors, the word-level tokenizer)."""
    import transformers as tf

    p = qwen_patch(kind)
    ip = tf.Qwen2VLImageProcessor(patch_size=p, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    if kind == "qwen3_vl":
        vp = tf.Qwen3VLVideoProcessor(patch_size=p, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 8})
        cls = tf.Qwen3VLProcessor
    else:
        vp = tf.Qwen2VLVideoProcessor(patch_size=p, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 8})
        cls = tf.Qwen2VLProcessor if kind == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    return cls(image_processor=ip, tokenizer=build_qwen_tokenizer(), video_processor=vp,
               chat_template=QWEN_CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------
# LLaVA-NeXT / LLaVA-OneVision (anyres)
# ----------------------------------------------------------------------------------------------

ANYRES_KINDS = ("llava_next", "llava_onevision")
CROP = 56                     # crop side in px: 4 x 4 patches of 14 px per crop
#: crop grids 1x2, 2x1, 2x2, 1x3, 3x1 (NeXT-like) and 3x3, 4x4 (OneVision's larger grids)
PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56], [168, 168], [224, 224]]
ANYRES_IDS = {"image": 4, "video": 5}


def anyres_config(kind: str = "llava_next", *, vision_layers: int = 3, vision_hidden: int = 32,
                  vision_heads: int = 4, llm_layers: int = 3, llm_hidden: int = 64, llm_heads: int = 4,
                  llm_kv_heads: int = 2, vocab_size: int = 256, crop: int = CROP, patch: int = 14,
                  pinpoints: list[list[int]] | None = None):
    """A tiny LLaVA-NeXT (CLIP + Llama, CLS dropped) or LLaVA-OneVision (SigLIP + Qwen2, no CLS)."""
    import transformers as tf

    pins = pinpoints or (PINPOINTS if kind == "llava_onevision" else PINPOINTS[:5])
    text = dict(hidden_size=llm_hidden, intermediate_size=llm_hidden * 2, num_hidden_layers=llm_layers,
                num_attention_heads=llm_heads, num_key_value_heads=llm_kv_heads, vocab_size=vocab_size,
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "llava_next":
        vision = tf.CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4,
                                     num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                     image_size=crop, patch_size=patch, projection_dim=vision_hidden)
        return tf.LlavaNextConfig(vision_config=vision, text_config=tf.LlamaConfig(**text),
                                  image_token_id=ANYRES_IDS["image"], image_grid_pinpoints=pins,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if kind == "llava_onevision":
        vision = tf.SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4,
                                       num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                       image_size=crop, patch_size=patch)
        return tf.LlavaOnevisionConfig(vision_config=vision, text_config=tf.Qwen2Config(**text),
                                       image_token_id=ANYRES_IDS["image"], video_token_id=ANYRES_IDS["video"],
                                       image_grid_pinpoints=pins, vision_feature_layer=-1,
                                       vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    raise ValueError(f"unknown anyres kind {kind!r}; one of {ANYRES_KINDS}")


def ov_pooled_side(vision_config: Any) -> int:
    """LLaVA-OneVision video: tokens a side of one frame after its 2x bilinear pooling (ceil(g / 2)
    for g patches a side); a video is frames x side^2 tokens + one newline."""
    return (vision_config.image_size // vision_config.patch_size + 1) // 2


def build_anyres(kind: str = "llava_next", seed: int = 0, dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "sdpa", **kw: Any):
    """A random tiny LLaVA-NeXT / OneVision of the real class, eval mode, vision attention sharpened."""
    import transformers as tf

    cls = {"llava_next": tf.LlavaNextForConditionalGeneration,
           "llava_onevision": tf.LlavaOnevisionForConditionalGeneration}[kind]
    cfg = anyres_config(kind, **kw)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    with torch.no_grad():
        tower = model.model.vision_tower
        for layer in (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model.eval()


ANYRES_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def build_anyres_tokenizer():
    special = ["<pad>", "<s>", "</s>", "[UNK]", "<image>", "<video>"]
    return word_tokenizer(special + sorted(set(WORDS)) + list("?.,:"),
                          {"image_token": "<image>", "video_token": "<video>"})


def build_anyres_processor(kind: str = "llava_next"):
    """The family's real processor (anyres image processor; OneVision also its video processor)."""
    import transformers as tf

    cfg = anyres_config(kind)
    pins = cfg.image_grid_pinpoints
    if kind == "llava_next":
        ip = tf.LlavaNextImageProcessor(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
                                        image_grid_pinpoints=pins)
        return tf.LlavaNextProcessor(image_processor=ip, tokenizer=build_anyres_tokenizer(), patch_size=14,
                                     num_additional_image_tokens=1,
                                     vision_feature_select_strategy="default", chat_template=ANYRES_CHAT_TEMPLATE)
    ip = tf.LlavaOnevisionImageProcessor(size={"height": CROP, "width": CROP}, image_grid_pinpoints=pins)
    vp = tf.LlavaOnevisionVideoProcessor(size={"height": CROP, "width": CROP})
    side = CROP // 14
    return tf.LlavaOnevisionProcessor(image_processor=ip, video_processor=vp, tokenizer=build_anyres_tokenizer(),
                                      num_image_tokens=side * side, vision_feature_select_strategy="full",
                                      vision_aspect_ratio="anyres_max_9", chat_template=ANYRES_CHAT_TEMPLATE)


def anyres_inputs(processor: Any, images: list[Any] = (), videos: list[Any] = (), question: str = "what is this",
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt through the real processor: ``images`` (PIL) then ``videos`` ((T, H, W, 3) uint8)."""
    content = ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
               + [{"type": "text", "text": question}])
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kw: dict[str, Any] = {"text": text, "return_tensors": "pt"}
    if images:
        kw["images"] = list(images)
    if videos:
        kw["videos"] = list(videos)
    return dict(processor(**kw))


def random_image(h: int, w: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def random_video(frames: int, h: int, w: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8)
