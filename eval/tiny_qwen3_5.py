"""Tiny Qwen3.5 / Qwen3.5-MoE models of the real transformers classes, built offline.

The LLM mixes both decoder-layer kinds, as the real checkpoints do (there a full-attention layer
every fourth, layer 0 a Gated DeltaNet one): ``LAYER_TYPES`` puts a linear-attention layer first,
full attention at layers 1 and 3, so an inner stage at K = 2 scores on layer 1 itself, one at K = 3
on layer 1 (the nearest full-attention layer below its linear layer 2), one at K = 4 on layer 3,
and one at K = 1 is refused (layer 0 is linear, nothing is below it). The vision tower is the
Qwen3-VL geometry (16 px patches, 2x2 merge, 2 frames per temporal patch); inputs go through the
real processor class of ``qwen3_5`` (``Qwen3VLProcessor``: Qwen2-VL image processor, Qwen3-VL video
processor with timestamps between frame groups) with the word-level tokenizer of
:mod:`tokenprune.eval.tiny` (special ids 4..7). Weights are random.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from . import tiny

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention", "linear_attention"]
#: the placeholder / marker ids of the tokenizer (image, video, vision start, vision end)
IDS = dict(tiny.QWEN_IDS)
#: one image of 128 x 192 px = 8 x 12 patches (24 tokens); a 4-frame clip of 128 x 128 px = 2 temporal
#: patches of 8 x 8 (2 x 16 tokens)
IMAGE_HW, BATCH_HW, VIDEO_SHAPE = (128, 192), [(128, 192), (192, 128)], (4, 128, 128)
QUESTION = "what is in the image"


def config(*, moe: bool = False, layer_types: list[str] | None = None, vision_layers: int = 3,
           vocab_size: int = 256) -> Any:
    """A tiny ``Qwen3_5Config`` (``moe``: ``Qwen3_5MoeConfig``): LLM hidden 64, 4 heads of 32 (2 kv),
    half of each head rotated (interleaved M-RoPE over 8 frequencies), Gated DeltaNet layers of
    2 key / 4 value heads of 16; vision tower of ``vision_layers`` blocks, hidden 32."""
    import transformers as tf

    types = list(layer_types or LAYER_TYPES)
    text: dict[str, Any] = dict(
        hidden_size=64, num_hidden_layers=len(types), num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, layer_types=types, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if moe:
        text.update(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                    num_experts_per_tok=2)
    else:
        text["intermediate_size"] = 128
    vision = dict(depth=vision_layers, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  num_position_embeddings=64)
    ids = dict(image_token_id=IDS["image"], video_token_id=IDS["video"],
               vision_start_token_id=IDS["vision_start"], vision_end_token_id=IDS["vision_end"])
    cls = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
    return cls(text_config=text, vision_config=vision, **ids)


def build(dtype: torch.dtype = torch.float32, seed: int = 0, *, moe: bool = False,
          attn_implementation: str = "sdpa", **kw: Any) -> Any:
    """A random tiny ``Qwen3_5ForConditionalGeneration`` (``moe``: the MoE class) in eval mode, its
    vision q/k sharpened (random init gives near-uniform attention, on which strategies agree)."""
    import transformers as tf

    cls = tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration
    cfg = copy.deepcopy(config(moe=moe, **kw))
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    with torch.no_grad():
        for blk in model.model.visual.blocks:
            d = blk.attn.qkv.out_features // 3
            blk.attn.qkv.weight[: 2 * d].mul_(4.0)
    return model.eval()


def build_processor() -> Any:
    """The real processor class AutoProcessor gives ``qwen3_5`` (``Qwen3VLProcessor``), offline; its
    video processor keeps every frame's own grid (no per-frame pixel cap, said explicitly)."""
    proc = tiny.build_qwen_processor("qwen3_vl")
    proc.video_processor.cap_pixels_per_frame = False
    return proc


_PROCESSOR: list[Any] = []


def processor() -> Any:
    """One shared processor (building it is not free; it is never mutated here)."""
    if not _PROCESSOR:
        _PROCESSOR.append(build_processor())
    return _PROCESSOR[0]


def video_kwargs(frames: int) -> dict[str, Any]:
    """The clip's metadata: the processor writes one timestamp per temporal patch from it."""
    return {"videos_kwargs": {"video_metadata": [{"fps": 2.0, "total_num_frames": frames}]}}


def encode(images: list[Any] = (), videos: list[Any] = (), question: str = QUESTION) -> dict[str, torch.Tensor]:
    """One user turn through the real processor: ``images`` (PIL), then ``videos`` ((T, H, W, 3) uint8)."""
    proc = processor()
    content = ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
               + [{"type": "text", "text": question}])
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kw: dict[str, Any] = {"text": text, "return_tensors": "pt"}
    if images:
        kw["images"] = list(images)
    if videos:
        kw["videos"] = list(videos)
        kw.update(video_kwargs(int(videos[0].shape[0])))
    return dict(proc(**kw))


def inputs(seed: int = 0, video: bool = True) -> dict[str, torch.Tensor]:
    """One prompt: an image of 8 x 12 patches and (``video``) a 4-frame clip, through the processor."""
    h, w = IMAGE_HW
    vids = [tiny.random_video(VIDEO_SHAPE[0], VIDEO_SHAPE[1], VIDEO_SHAPE[2], seed + 5)] if video else []
    return encode(images=[tiny.random_image(h, w, seed)], videos=vids)


def batch(equal: bool = False) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two rows, left-padded by the processor, and the same rows alone: an 8 x 12-patch image and a
    short question; a 12 x 8-patch image, a longer question and (unless ``equal``) the clip. With
    ``equal`` both rows have 24 visual tokens (a budget drops as many from each), else 24 and 56."""
    proc = processor()
    images = [tiny.random_image(h, w, i + 1) for i, (h, w) in enumerate(BATCH_HW)]
    clips = [] if equal else [tiny.random_video(VIDEO_SHAPE[0], VIDEO_SHAPE[1], VIDEO_SHAPE[2], 7)]
    questions = [QUESTION, "how many objects are there in the picture"]
    contents = [[{"type": "image"}], [{"type": "image"}] + [{"type": "video"} for _ in clips]]
    texts = [proc.apply_chat_template([{"role": "user", "content": c + [{"type": "text", "text": q}]}],
                                      add_generation_prompt=True) for c, q in zip(contents, questions)]
    kw: dict[str, Any] = {"text": texts, "images": images, "return_tensors": "pt", "padding": True}
    if clips:
        kw.update(videos=clips, **video_kwargs(VIDEO_SHAPE[0]))
    side = proc.tokenizer.padding_side
    proc.tokenizer.padding_side = "left"
    try:
        both = dict(proc(**kw))
    finally:
        proc.tokenizer.padding_side = side
    return both, [encode(images=[images[0]], question=questions[0]),
                  encode(images=[images[1]], videos=clips, question=questions[1])]


def case(moe: bool = False) -> Any:
    """The kit's :class:`~tokenprune.testing.FamilyCase` (placeholder and marker ids suppressed:
    an uncached step re-feeds the generated tokens with the pixels)."""
    from tokenprune.testing import FamilyCase

    return FamilyCase("qwen3_5_moe" if moe else "qwen3_5",
                      build=lambda dtype=torch.float32: build(dtype=dtype, moe=moe),
                      inputs=inputs, batch=batch, suppress=tuple(IDS.values()))


def save(path: str | Path, *, moe: bool = False) -> Path:
    """The tiny model and its processor in ``path`` (``from_pretrained`` / ``tokenprune.load`` read it)."""
    p = Path(path)
    build(moe=moe).save_pretrained(p)
    build_processor().save_pretrained(p)
    return p
