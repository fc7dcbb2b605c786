"""Qwen3.5 families: ``Qwen3_5ForConditionalGeneration`` (model_type ``qwen3_5``) and
``Qwen3_5MoeForConditionalGeneration`` (``qwen3_5_moe``: the same layout, sparse-MoE MLPs).

Knowledge held here (transformers 5.x ``models/qwen3_5/modeling_qwen3_5.py``; the MoE file is the
same where it matters):

* The vision tower (``model.model.visual``, ``Qwen3_5VisionModel``) is Qwen3-VL's: patches packed
  as one flat sequence with ``grid_thw``, attention per ``cu_seqlens`` segment from the block's
  ``qkv`` and the rotary (cos, sin) it is called with, one 2x2 ``merger``
  (``Qwen3_5VisionPatchMerger``, pre-shuffle norm) whose output is the pooler output the model
  scatters into the placeholders. There is no DeepStack (no ``deepstack_visual_indexes``, no
  per-level mergers, no ``visual_pos_masks`` for the LLM), so scores, layouts, selection on the
  merger output, video units and overlays are :class:`~tokenprune.patches.qwen_vl.Qwen3VLFamily`'s
  and an inner stage may cut from layer 1 on as far as the vision side is concerned. The
  processor is ``Qwen3VLProcessor`` (timestamps between a video's temporal patches).
* The LLM (``Qwen3_5TextModel``) mixes two decoder-layer kinds by ``text_config.layer_types``:
  ``"full_attention"`` layers (``self_attn``: a gated ``q_proj`` whose query half goes through
  ``q_norm``, ``k_proj`` + ``k_norm``, then a *partial* rotary: the first ``cos.shape[-1]`` dims of
  each head are rotated with the interleaved M-RoPE cos/sin, the rest pass) and
  ``"linear_attention"`` layers (``linear_attn``: Gated DeltaNet, a causal depthwise conv over time
  then the gated delta-rule recurrence; no keys, no attention probabilities). Real checkpoints put a
  full-attention layer every fourth (layers 3, 7, ...).
* Scoring (inner-LLM strategies): the q/k of a full-attention layer are read after ``q_norm`` /
  ``k_norm`` (head-split) and rotated with the model's own ``apply_rotary_pos_emb``. A stage at K
  reads layer K-1 when it is full attention, else the nearest full-attention layer below it
  (:meth:`Qwen35Family.llm_scoring_layer`, reported as ``StageStats.score_layer``); with none below,
  the strategy is refused with a ConfigError naming the first K that works. ``min_inner_layer`` is
  one past the first full-attention layer, so scaled default layers (PyramidDrop, SparseVLM) start
  where a score exists.
* Padding and the recurrent state. The text model gives linear layers the 2D padding mask only
  (``create_recurrent_attention_mask``: None when nothing is padded and for one-token steps), and
  ``apply_mask_to_padding_states`` zeroes the masked rows' inputs. Zeroed rows are invisible only
  *before* the first real token (zero conv inputs equal the conv's own left padding, and a zero
  state stays zero under the decay); in the middle of a row they still take a conv slot and decay
  the state. Hence:

  - vision-stage pruning (the LLM gets a shorter, left-padded input: new padding in front, the 2D
    mask cut the same way) is exact for every layer kind, in batches, cached or not, with beam
    search and with a static cache (its linear layers keep fixed-size states);
  - inner stages cut the hidden states before layer K, so every linear layer >= K builds its conv
    and recurrent state from the kept tokens only, at prefill and from the cache after; but rows
    cannot be padded with masked "ghost" tokens (``inner_ghosts = False``): a batch whose rows
    would drop different numbers of tokens is refused with a typed error before the LLM runs (one
    row per call); rows that drop equally many (beam search's copies, equal prompts) run batched,
    their padding in front as at the input.

  The KV-cache length the model reads (``get_seq_length``, the causal masks) is the first
  full-attention layer's, which is always below K (it is at or below the scoring layer): the
  engine's decode-step positions and masks see the uncut length, as for other families.
* FLOPs estimates count every decoder layer as full attention (DeltaNet layers cost less: linear in
  the length), the MoE MLP as its active experts plus the shared expert.
"""
from __future__ import annotations

import importlib
from functools import partial
from typing import Any, Callable

import torch

from tokenprune.errors import ConfigError
from tokenprune.family import LLMAttention
from tokenprune.registry import register_family
from tokenprune.stats import LayerDims
from tokenprune.strategies.base import LLMInfo

from .qwen_vl import Qwen3VLFamily

FULL, LINEAR = "full_attention", "linear_attention"


def _model_rotary(apply: Callable[..., Any], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's own (partial) rotary on [B, H, L, d] with [B, L, r] cos/sin (r <= d)."""
    return apply(x, x, cos, sin)[0]


@register_family
class Qwen35Family(Qwen3VLFamily):
    name = "qwen3_5"
    model_types = ("qwen3_5",)
    modeling = "transformers.models.qwen3_5.modeling_qwen3_5"
    #: Gated DeltaNet layers cannot hide a token in the middle of a row by the mask
    inner_ghosts = False

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        tcfg = model.config.text_config
        types = list(getattr(tcfg, "layer_types", None) or [])
        if len(types) != len(self.decoder_layers):   # no per-layer types: what each layer holds
            types = [FULL if hasattr(layer, "self_attn") else LINEAR for layer in self.decoder_layers]
        #: the decoder layers with softmax attention (the only ones with q/k to score with)
        self.full_layers = [i for i, t in enumerate(types) if t == FULL]
        self.layer_types = types
        n = len(self.decoder_layers)
        self.min_inner_layer = self.full_layers[0] + 1 if self.full_layers else n
        self.llm_info = LLMInfo(num_layers=n, min_layer=self.min_inner_layer)
        if not self.full_layers:        # nothing to score with inside the LLM
            self.provides = self.provides - {"llm_attention"}
        self._apply_rotary = importlib.import_module(self.modeling).apply_rotary_pos_emb

    # --- LLM --------------------------------------------------------------------------------
    def llm_scoring_layer(self, layer: int) -> int:
        """``layer`` (= K-1) if it is full attention, else the nearest full-attention layer below it."""
        below = [j for j in self.full_layers if j <= layer]
        if not below:
            first = self.full_layers[0] if self.full_layers else None
            raise ConfigError(
                f"an inner-LLM stage at layer {layer + 1} scores on decoder layer {layer}, a linear-attention "
                f"(Gated DeltaNet) layer of {self.name} with no full-attention layer at or below it "
                f"(full-attention layers: {self.full_layers}); "
                + (f"use layer >= {first + 1}" if first is not None else "this LLM has none"))
        return below[-1]

    def llm_attention(self, layer: int) -> LLMAttention:
        attn = getattr(self.decoder_layers[layer], "self_attn", None)
        if attn is None:
            raise ConfigError(f"decoder layer {layer} of {self.name} is a linear-attention (Gated DeltaNet) "
                              f"layer: it has no q/k (full-attention layers: {self.full_layers})")
        tcfg = self.model.config.text_config
        # q_norm / k_norm act after the head split (q: the query half of the gated q_proj)
        return LLMAttention(module=attn, q_source=attn.q_norm, k_source=attn.k_norm,
                            num_heads=tcfg.num_attention_heads, num_kv_heads=tcfg.num_key_value_heads,
                            head_dim=attn.head_dim, scaling=attn.scaling,
                            rotary=partial(_model_rotary, self._apply_rotary))

    def llm_dims(self) -> tuple[LayerDims, int]:
        t = self.model.config.text_config
        hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        mlp = getattr(t, "intermediate_size", None)
        if mlp is None:       # MoE: the active experts and the shared expert
            mlp = t.moe_intermediate_size * t.num_experts_per_tok + t.shared_expert_intermediate_size
        dims = LayerDims(hidden=t.hidden_size, q_dim=t.num_attention_heads * hd,
                         kv_dim=t.num_key_value_heads * hd, mlp=int(mlp), gated=True)
        return dims, t.num_hidden_layers

    # --- benchmark inputs ----------------------------------------------------------------------
    def bench_inputs(self, batch: int, text_tokens: int, size: tuple[int, int] | None = None,
                     video_frames: int | None = None) -> dict[str, torch.Tensor]:
        """One image of ``size`` = (h, w) patches per row (Qwen3-VL's 16 px geometry), the prompt
        padded to ``text_tokens`` text tokens; the config's own special ids."""
        from tokenprune.eval.tiny import QWEN_IDS, qwen_batch, qwen_inputs, qwen_prompt

        if video_frames or size is None:
            raise NotImplementedError("the Qwen bench rows are one image of a given size (h, w) in patches")
        cfg = self.model.config
        one = qwen_inputs("qwen3_vl", images=[size], seed=1)
        n_img = size[0] * size[1] // 4
        vocab = min(cfg.text_config.vocab_size, 1024)
        ids = qwen_prompt([("image", n_img)], vocab=vocab)
        pad = text_tokens - (ids.shape[1] - n_img)
        ids = torch.cat([ids[:, :1], torch.randint(10, vocab, (1, max(0, pad))), ids[:, 1:]], 1)
        one["input_ids"], one["attention_mask"] = ids, torch.ones_like(ids)
        inp = qwen_batch("qwen3_vl", [one] * batch)      # (token types from the ids)
        real = inp["input_ids"].clone()
        for key, attr in (("image", "image_token_id"), ("video", "video_token_id"),
                          ("vision_start", "vision_start_token_id"), ("vision_end", "vision_end_token_id")):
            real[inp["input_ids"] == QWEN_IDS[key]] = int(getattr(cfg, attr))
        inp["input_ids"] = real
        return inp


@register_family
class Qwen35MoeFamily(Qwen35Family):
    name = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)
    modeling = "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe"
