"""Start the tiny video model from the trained tiny image model (``assets/tiny-llava-vqa``).

The video frames are rendered by the same scene renderer as the images, so the image model's
tower already tells colours *and shapes* apart at its feature layer, and its LLM already does the
content lookups ("the colour of the triangle") that the video answers need. A video model trained
from scratch on a CPU never got there: its tower did not encode shape (``probe_video``), and the
LLM cannot learn a lookup its inputs do not carry.

What is carried over, weight for weight, into a real ``LlavaOnevisionForConditionalGeneration``:

- **tower**: patch embedding, position embeddings of the 256 patches (the CLS one is dropped),
  and the encoder layers up to the image model's ``vision_feature_layer`` (5 of 6, so the video
  model's ``vision_feature_layer = -1`` reads the same layer); ``quick_gelu`` as CLIP. The CLIP
  normalisation is folded into the patch convolution (SigLIP's has a bias), so the video model
  takes SigLIP-normalised pixels and computes exactly the image tower's patch embeddings.
  Not exact beyond that: SigLIP has no CLS token and no pre-layernorm, so the encoder sees
  slightly different inputs — a short stage A (dense per-patch loss) re-adapts it.
- **projector**: same ``linear_1 / act / linear_2`` (OneVision then pools 2 x 2).
- **LLM**: Llama -> Qwen2 of the same sizes: every weight copied, Qwen2's q/k/v biases zero, so
  the two compute the same function; embedding and LM-head rows copied by word (the video words
  that the image vocabulary lacks keep their fresh initialisation; ``<video>`` takes ``<image>``'s).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tokenprune.eval.synthetic.model import CLIP_MEAN, CLIP_STD
from tokenprune.eval.synthetic.model import build_tokenizer as image_tokenizer
from tokenprune.eval.synthetic.video_model import SIGLIP_MEAN, SIGLIP_STD, video_config
from tokenprune.eval.synthetic.video_model import build_tokenizer as video_tokenizer
from tokenprune.eval.tiny import IMAGE_TOKEN

TOWER = "model.vision_tower."
LLM = "model.language_model."


def tower_depth(image_config: Any) -> int:
    """Encoder layers up to (and including) the image model's feature layer: 5 for -2 of 6."""
    layer = image_config.vision_feature_layer
    return layer if layer >= 0 else image_config.vision_config.num_hidden_layers + 1 + layer


def folded_patch_embedding(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP patch conv weight [d, 3, p, p] (no bias, on CLIP-normalised pixels) -> weight and bias
    of a conv on SigLIP-normalised pixels with the same output: x_clip = (x_siglip * s' + m' - m) / s."""
    m = torch.tensor(CLIP_MEAN, dtype=weight.dtype)[None, :, None, None]
    s = torch.tensor(CLIP_STD, dtype=weight.dtype)[None, :, None, None]
    sm = torch.tensor(SIGLIP_MEAN, dtype=weight.dtype)[None, :, None, None]
    ss = torch.tensor(SIGLIP_STD, dtype=weight.dtype)[None, :, None, None]
    return weight * ss / s, (weight * (sm - m) / s).sum((1, 2, 3))


def from_image_model(path: str | Path, seed: int = 0, device: str = "cpu") -> Any:
    """The video model with the tower, projector and LLM of the image model saved at ``path``."""
    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    image = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    kinds = (image.config.vision_config.model_type, image.config.text_config.model_type)
    if kinds != ("clip_vision_model", "llama"):
        raise ValueError(f"{path}: expected a LLaVA with a CLIP tower and a Llama LLM (the tiny image model), "
                         f"got {kinds[0]} / {kinds[1]}")
    depth = tower_depth(image.config)
    iv, it = image.config.vision_config, image.config.text_config
    cfg = video_config(vision_layers=depth, vision_hidden=iv.hidden_size, llm_layers=it.num_hidden_layers,
                       llm_hidden=it.hidden_size)
    cfg.vision_config.hidden_act = iv.hidden_act
    cfg.vision_config.layer_norm_eps = iv.layer_norm_eps
    torch.manual_seed(seed)
    with torch.device(device):
        video = LlavaOnevisionForConditionalGeneration._from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    src, dst = image.state_dict(), video.state_dict()
    new: dict[str, torch.Tensor] = {}
    w, b = folded_patch_embedding(src[TOWER + "embeddings.patch_embedding.weight"])
    new[TOWER + "embeddings.patch_embedding.weight"], new[TOWER + "embeddings.patch_embedding.bias"] = w, b
    new[TOWER + "embeddings.position_embedding.weight"] = src[TOWER + "embeddings.position_embedding.weight"][1:]
    for k, t in src.items():
        if k.startswith(TOWER + "encoder.layers."):
            if int(k.split(".")[4]) < depth:
                new[k] = t
        elif k.startswith(("model.multi_modal_projector.", LLM)) and "embed_tokens" not in k:
            new[k] = t
    for k in dst:        # Qwen2's attention biases (Llama has none): zero, so the LLM is the same function
        if k.startswith(LLM) and k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            new[k] = torch.zeros_like(dst[k])
    emb, head = dst[LLM + "embed_tokens.weight"].clone(), dst["lm_head.weight"].clone()
    ivoc = image_tokenizer().get_vocab()
    for word, j in video_tokenizer().get_vocab().items():
        i = ivoc.get(IMAGE_TOKEN if word == "<video>" else word)
        if i is not None:
            emb[j], head[j] = src[LLM + "embed_tokens.weight"][i], src["lm_head.weight"][i]
    new[LLM + "embed_tokens.weight"], new["lm_head.weight"] = emb, head
    unknown = sorted(set(new) - set(dst))
    if unknown:
        raise ValueError(f"weights with no place in the video model: {unknown[:5]}")
    video.load_state_dict(new, strict=False)    # the rest (image_newline, post-layernorm, head) stays at init
    return video                                # built on ``device``; load_state_dict copies into place
