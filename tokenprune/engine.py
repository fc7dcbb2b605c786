"""The engine: installs native hooks on a model's instances, carries per-call state, and slices
the LLM's inputs (prefill and every decode step) and, for inner-LLM strategies, every later
decoder layer's hidden states, rotary cos/sin, position ids and masks.

Per-call state lives in a ``ContextVar`` (one per handle), so two threads calling the same
patched model never see each other's tensors. State that must outlive one forward call (what
was kept at prefill, needed by every decode step) is keyed by the KV-cache object of that
generation in a weak dictionary, never stored on modules.
"""
from __future__ import annotations

import contextvars
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .attention import last_row_attention, vision_reductions
from .config import PruneConfig
from .errors import UnsupportedCallError
from .family import Family
from .stats import PruneStats, layer_flops
from .strategies.base import Selection, StrategySpec, VisualTokens


# ----------------------------------------------------------------------------------------------
# sequence helpers
# ----------------------------------------------------------------------------------------------

def take(x: torch.Tensor, idx: torch.Tensor, dim: int, fill: Any = 0) -> torch.Tensor:
    """Gather along ``dim`` with a per-row index ``idx`` [B, L'] (-1 = padding, filled with ``fill``).

    ``x`` has its batch at dim 0 (size B or 1, broadcast).
    """
    b, n = idx.shape
    dim = dim % x.dim()
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    view = [1] * x.dim()
    view[0], view[dim] = b, n
    target = list(x.shape)
    target[dim] = n
    gidx = idx.clamp(min=0).to(x.device).view(view).expand(target)
    out = torch.gather(x, dim, gidx)
    pad = idx < 0
    if bool(pad.any()):
        out = out.masked_fill(pad.to(x.device).view(view).expand(target), fill)
    return out


def take_positions(pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] or [R, B, L] (M-RoPE rows) gathered along the sequence (pads -> 1)."""
    if pos.dim() == 3:
        return take(pos.transpose(0, 1), idx, 2, 1).transpose(0, 1)
    return take(pos, idx, 1, 1)


def left_packed_index(keep: torch.Tensor) -> torch.Tensor:
    """keep [B, L] bool -> idx [B, max kept] of kept positions per row, left-padded with -1."""
    counts = keep.sum(dim=1)
    width = int(counts.max())
    rows = []
    for r in range(keep.shape[0]):
        pos = torch.nonzero(keep[r]).flatten()
        rows.append(torch.cat([torch.full((width - pos.numel(),), -1, dtype=torch.long, device=keep.device), pos]))
    return torch.stack(rows)


def _min_value(mask: torch.Tensor) -> Any:
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def _mask_keys(mask: torch.Tensor, ghost: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Hide ghost keys (first ``n_keys`` key columns) of a 2D [B, K] or 4D [B, h, Q, K] mask;
    a ghost query still sees itself (so no softmax row is empty)."""
    g = torch.zeros(mask.shape[0], mask.shape[-1], dtype=torch.bool, device=mask.device)
    g[:, :n_keys] = ghost.to(mask.device)
    if mask.dim() == 2:
        return mask.masked_fill(g, 0)
    hide = g[:, None, None, :].expand(mask.shape[0], 1, mask.shape[-2], mask.shape[-1])
    if mask.shape[-2] == n_keys:  # prefill: keep the diagonal
        hide = hide & ~torch.eye(n_keys, dtype=torch.bool, device=mask.device)
    return mask.masked_fill(hide, _min_value(mask))


def _cache_of(kwargs: dict[str, Any]) -> Any:
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _seq_len(cache: Any, layer: int = 0) -> int:
    return int(cache.get_seq_length(layer)) if cache is not None else 0


#: encodings kept waiting for their forward call (bounds memory if a user encodes and never calls)
MAX_PENDING = 8


def _find_encoding(encoded: list["Encoded"], f: torch.Tensor) -> tuple["Encoded", int] | None:
    """The (encoding, image index) whose projector output row is ``f`` (same storage or equal)."""
    for e in reversed(encoded):
        for i in range(e.output.shape[0]):
            if e.output[i].data_ptr() == f.data_ptr() and e.output[i].shape == f.shape:
                return e, i
    for e in reversed(encoded):
        for i in range(e.output.shape[0]):
            row = e.output[i]
            if row.shape == f.shape and torch.equal(row, f.to(row.device, row.dtype)):
                return e, i
    return None


# ----------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------

@dataclass
class PruneRecord:
    """What a prefill kept; outlives the call, keyed by its KV cache, used on decode steps."""

    full_len: int                          # LLM input length before pruning
    idx: torch.Tensor | None = None        # [B, L'] input-level gather index (-1 = new padding)
    dropped: torch.Tensor | None = None    # [B] visual tokens dropped per row (compact positions)
    compact: bool = False
    layer: int | None = None               # inner-LLM: first layer that sees the kept tokens
    idx_k: torch.Tensor | None = None      # [B, L_K] kept positions at layer K
    ghost: torch.Tensor | None = None      # [B, L_K] True where a token only pads a row (masked key)


@dataclass
class VisionCall:
    """State of one vision-encoder + projector pass (may run before the forward that uses it:
    transformers 5.24's ``generate`` encodes images first and passes ``mm_encoder_outputs``)."""

    scores: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    qk: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    selections: list[Selection] | None = None
    seconds: float = 0.0


@dataclass
class Encoded:
    """A projector output and the selections made for its images, waiting to be scattered."""

    output: torch.Tensor                   # [n_img, N, D]
    selections: list[Selection]
    seconds: float
    seq: int                               # increasing per handle: orders encodings and calls


@dataclass
class CallState:
    visual: torch.Tensor | None = None                     # [B, L] placeholder mask
    images: list[int] = field(default_factory=list)        # batch row of each image, in order
    encoded_mark: int = 0                                  # first encoding seq of this call
    given: list[torch.Tensor] | None = None                # pre-encoded image features, if passed
    qk: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0
    stats: PruneStats | None = None
    pending: PruneRecord | None = None
    record: PruneRecord | None = None       # the record layers must follow in this call
    fastv: dict[str, Any] | None = None
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# handle
# ----------------------------------------------------------------------------------------------

class PruneHandle:
    """A strategy installed on one model. ``last_stats``, ``remove()``, context manager."""

    def __init__(self, model: nn.Module, family: Family, spec: StrategySpec, config: PruneConfig) -> None:
        self.model = model
        self.family = family
        self.spec = spec
        self.config = config
        self.last_stats: PruneStats | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._state: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
            f"tokenprune_state_{id(self)}", default=None)
        self._vision: contextvars.ContextVar[VisionCall | None] = contextvars.ContextVar(
            f"tokenprune_vision_{id(self)}", default=None)
        # recent encodings per thread: generate (transformers >= 5.24) encodes images before the
        # forward calls that use them, and with use_cache=False reuses them on every step
        self._encoded_by_thread: dict[int, list[Encoded]] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._records: "weakref.WeakKeyDictionary[Any, PruneRecord]" = weakref.WeakKeyDictionary()
        self._removed = False
        info = family.vision_info
        self._prefix = family.num_prefix
        self._n_img_tokens = family.tokens_per_image
        self._n_keep_total = config.tokens_for(self._n_img_tokens)
        self._n_keep = self._n_keep_total - self._prefix
        self.requests = spec.requests(config, info) if spec.stage == "vision" else []
        self.llm_layer = spec.llm_layer(config, family.llm_info) if spec.stage == "llm" else None
        #: layers whose attention rows are materialised (vision layers, or LLM layer K-1)
        self.scored_layers: list[tuple[str, int]] = (
            sorted({("vision", r.layer) for r in self.requests}) if spec.stage == "vision"
            else [("llm", self.llm_layer - 1)])  # type: ignore[operator]

    # -- install / remove ------------------------------------------------------------------------
    def _add(self, h: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(h)

    def install(self) -> "PruneHandle":
        fam = self.family
        self._add(fam.outer.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
        self._add(fam.outer.register_forward_hook(self._outer_post, always_call=True))
        self._add(fam.language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self._add(fam.language_model.register_forward_hook(self._lm_post))
        if self.spec.stage == "vision":
            kinds: dict[int, set[str]] = {}
            for r in self.requests:
                kinds.setdefault(r.layer, set()).add(r.kind)
            for layer, ks in kinds.items():
                va = fam.vision_attention(layer)
                self._add(va.q_source.register_forward_hook(self._capture(layer, "q")))
                self._add(va.k_source.register_forward_hook(self._capture(layer, "k")))
                self._add(va.module.register_forward_hook(self._reduce_vision(layer, va, ks)))
            self._add(fam.vision_tower.register_forward_pre_hook(self._vision_pre))
            self._add(fam.projector.register_forward_pre_hook(self._projector_pre))
            self._add(fam.projector.register_forward_hook(self._projector_post))
        else:
            k = self.llm_layer
            la = fam.llm_attention(k - 1)
            self._add(la.q_source.register_forward_hook(self._capture(k - 1, "q")))
            self._add(la.k_source.register_forward_hook(self._capture(k - 1, "k")))
            self._add(la.module.register_forward_pre_hook(self._llm_attn_pre, with_kwargs=True))
            self._add(la.module.register_forward_hook(self._llm_attn_post(la)))
            for layer in fam.decoder_layers[k:]:
                self._add(layer.register_forward_pre_hook(self._layer_pre, with_kwargs=True))
        return self

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before ``apply``."""
        from . import api  # late import: api owns the model -> handle table

        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._records = weakref.WeakKeyDictionary()
        with self._lock:
            self._encoded_by_thread.clear()
        self._removed = True
        api._forget(self.model, self)

    @property
    def active(self) -> bool:
        return not self._removed

    def __enter__(self) -> "PruneHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PruneHandle({self.config!r}, family={self.family.name!r}, active={self.active})"

    # -- outer model: start / end of one call ---------------------------------------------------
    def _outer_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        visual = self.family.visual_mask(args, kwargs)
        state = CallState()
        if visual is not None and bool(visual.any()):
            counts = visual.sum(dim=1)
            if bool((counts % self._n_img_tokens != 0).any()):
                raise UnsupportedCallError(
                    f"visual placeholder counts per row {counts.tolist()} are not multiples of "
                    f"{self._n_img_tokens} tokens per image")
            state.visual = visual
            for row, c in enumerate((counts // self._n_img_tokens).tolist()):
                state.images.extend([row] * c)
            state.stats = PruneStats(strategy=self.spec.name)
            state.encoded_mark = self._seq

            given = (kwargs.get("mm_encoder_outputs") or {}).get("image")
            if given is not None and kwargs.get("pixel_values") is None:
                state.given = list(given.pooler_output)
        self._state.set(state)

    def _outer_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._state.set(None)

    # -- attention capture --------------------------------------------------------------------
    def _capture(self, layer: int, which: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.spec.stage == "vision":
                target = self._vision.get()
            else:
                target = self._state.get()
                if target is None or target.fastv is None or "idx" in target.fastv:
                    return
            if target is not None:
                target.qk.setdefault(layer, {})[which] = output
        return hook

    def _reduce_vision(self, layer: int, va: Any, kinds: set[str]):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            state = self._vision.get()
            if state is None or layer not in state.qk:
                return
            t0 = time.perf_counter()
            qk = state.qk.pop(layer)
            for kind, value in vision_reductions(qk["q"], qk["k"], va.num_heads, va.scale, kinds).items():
                state.scores[(layer, kind)] = value
            state.seconds += time.perf_counter() - t0
        return hook

    # -- vision stage: score in the encoder, select at the projector input --------------------
    def _vision_pre(self, module: nn.Module, args: tuple) -> None:
        self._vision.set(VisionCall())

    def _projector_pre(self, module: nn.Module, args: tuple) -> tuple | None:
        state = self._vision.get()
        if state is None:
            return None
        t0 = time.perf_counter()
        feats = args[0]                              # [n_img, P + h*w, D]
        info, p = self.family.vision_info, self._prefix
        cls_off = 1 if info.has_cls else 0
        merged = None
        batched = None
        if self.spec.select_batch is not None:   # one call for all images: no per-image loop / syncs
            tokens = VisualTokens(grid=info.grid, features=feats[:, p:],
                                  scores={key: v[:, cls_off:] for key, v in state.scores.items()})
            batched = self.spec.select_batch(self.config, tokens, self._n_keep, info)
        selections = []
        for i in range(feats.shape[0]):
            if batched is not None:
                sel = batched[i]
            else:
                scores = {key: v[i, cls_off:] for key, v in state.scores.items()}
                tokens = VisualTokens(grid=info.grid, features=feats[i, p:], scores=scores)
                sel = self.spec.select(self.config, tokens, self._n_keep, info)  # type: ignore[misc]
            if sel.indices.numel() != self._n_keep:
                raise RuntimeError(f"strategy {self.spec.name} kept {sel.indices.numel()} tokens, "
                                   f"budget is {self._n_keep}")
            if sel.features is not None:
                if merged is None:
                    merged = feats.clone()
                merged[i, p + sel.indices.to(feats.device)] = sel.features.to(feats.device, feats.dtype)
            selections.append(sel)
        state.selections = selections
        state.scores.clear()
        state.seconds += time.perf_counter() - t0
        if merged is not None:
            return (merged,) + tuple(args[1:])
        return None

    def _projector_post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        state = self._vision.get()
        self._vision.set(None)
        if state is None or state.selections is None:
            return
        encoded = self._encoded()
        with self._lock:
            self._seq += 1
            seq = self._seq
        encoded.append(Encoded(output, state.selections, state.seconds, seq))
        del encoded[:-MAX_PENDING]

    def _encoded(self) -> list[Encoded]:
        """This thread's recent encodings (newest last)."""
        with self._lock:
            return self._encoded_by_thread.setdefault(threading.get_ident(), [])

    def _take_selections(self, state: CallState) -> list[Selection]:
        """Selections of the images of this call, in placeholder order."""
        encoded = self._encoded()
        if state.given is None:  # encoded inside this forward call
            mine = [e for e in encoded if e.seq > state.encoded_mark]
            sels = [s for e in mine for s in e.selections]
            state.seconds += sum(e.seconds for e in mine)
        else:  # pre-encoded (generate in transformers >= 5.24): find each image's encoding
            sels, used = [], set()
            for f in state.given:
                hit = _find_encoding(encoded, f)
                if hit is None:
                    raise UnsupportedCallError(
                        "pre-computed image features (mm_encoder_outputs) were not produced by this "
                        "patched model; pass pixel_values instead")
                e, i = hit
                sels.append(e.selections[i])
                if id(e) not in used:
                    used.add(id(e))
                    state.seconds += e.seconds
        if len(sels) != len(state.images):
            raise UnsupportedCallError(
                f"{len(sels)} encoded images for {len(state.images)} images in the prompt")
        return sels

    # -- language model entry: prune inputs (prefill) or follow a record (decode) ---------------
    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        state = self._state.get()
        if state is None:  # language model called directly
            state = CallState()
            self._state.set(state)
        cache = _cache_of(kwargs)
        record = self._records.get(cache) if cache is not None else None
        if state.visual is None:
            if record is None:
                return None  # text-only call: pass-through
            state.record = record
            return args, self._decode_inputs(record, kwargs, cache)
        if record is not None or _seq_len(cache) > 0:
            raise UnsupportedCallError(
                "pruning a prefill that continues a non-empty KV cache is not supported; "
                "start a new generation for each prompt with images")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[:2] != state.visual.shape:
            raise UnsupportedCallError("the language model did not receive inputs_embeds of the prompt's shape")
        if self.spec.stage == "llm":
            return self._start_inner(state, kwargs, cache)
        return args, self._prune_inputs(state, kwargs)

    def _lm_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._state.get()
        if state is None:
            return
        if state.pending is not None:
            cache = getattr(output, "cache", None)
            if cache is None:
                cache = getattr(output, "past_key_values", None)
            if cache is not None:
                self._records[cache] = state.pending
            state.pending = None
        if state.stats is not None and state.stats.visual_tokens_in:
            state.stats.prune_ms = state.seconds * 1000.0
            self.last_stats = state.stats
            state.stats = None

    def _prune_inputs(self, state: CallState, kwargs: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        visual = state.visual
        embeds = kwargs["inputs_embeds"]
        b, length = visual.shape
        flags = []
        selections = self._take_selections(state)
        for sel in selections:
            f = torch.zeros(self._n_img_tokens, dtype=torch.bool, device=visual.device)
            f[: self._prefix] = True
            f[self._prefix + sel.indices.to(visual.device)] = True
            flags.append(f)
        keep = ~visual
        keep[visual] = torch.cat(flags)
        self._fill_stats(state, keep, b)
        assert state.stats is not None
        state.stats.merge_groups = [[] for _ in range(b)]
        for row, sel in zip(state.images, selections):
            state.stats.merge_groups[row].append(None if sel.groups is None else sel.groups.cpu())
        dropped_mask = visual & ~keep
        self._fill_flops(state, length, int(keep.sum(1).max()), b)
        if not bool(dropped_mask.any()):
            state.seconds += time.perf_counter() - t0
            return kwargs
        idx = left_packed_index(keep)
        new = dict(kwargs)
        new["inputs_embeds"] = take(embeds, idx, 1, 0)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise UnsupportedCallError("input pruning needs a 2D attention_mask (or none)")
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.long, device=embeds.device)
        new["attention_mask"] = take(mask, idx, 1, 0)  # explicit, avoids packed-sequence detection
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=embeds.device)[None].expand(b, length)
        compact = self.config.positions == "compact"
        if compact:
            shift = torch.cumsum(dropped_mask.long(), dim=1)
            pos = pos - (shift if pos.dim() == 2 else shift[None])
        new["position_ids"] = take_positions(pos, idx)
        state.pending = PruneRecord(full_len=length, idx=idx, dropped=dropped_mask.sum(1), compact=compact)
        state.seconds += time.perf_counter() - t0
        return new

    def _decode_inputs(self, rec: PruneRecord, kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
        if rec.idx is None:
            return kwargs  # inner-LLM record: the LLM input is not pruned
        new = dict(kwargs)
        embeds = kwargs.get("inputs_embeds")
        q = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        b = rec.idx.shape[0]
        past = _seq_len(cache)
        n_new = rec.idx.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            new["attention_mask"] = torch.cat([take(mask[:, :rec.full_len], rec.idx, 1, 0), mask[:, rec.full_len:]], 1)
        elif bool((rec.idx < 0).any()):
            m = torch.ones(b, past + q, dtype=torch.long, device=rec.idx.device)
            m[:, :n_new] = (rec.idx >= 0).long()
            new["attention_mask"] = m
        pos = kwargs.get("position_ids")
        if pos is None:
            offset = 0 if rec.compact else rec.full_len - n_new
            new["position_ids"] = (torch.arange(q, device=rec.idx.device) + past + offset)[None].expand(b, q)
        elif rec.compact:
            d = rec.dropped.to(pos.device)
            new["position_ids"] = pos - (d[:, None] if pos.dim() == 2 else d[None, :, None])
        return new

    # -- statistics -------------------------------------------------------------------------
    def _fill_stats(self, state: CallState, keep: torch.Tensor, b: int) -> None:
        st = state.stats
        assert st is not None
        visual = state.visual
        st.visual_tokens_in = visual.sum(1).tolist()
        st.visual_tokens_kept = (visual & keep).sum(1).tolist()
        st.kept_indices = [[] for _ in range(b)]
        for row, kept in zip(state.images, self._image_kept(state, keep)):
            st.kept_indices[row].append(kept)

    def _image_kept(self, state: CallState, keep: torch.Tensor) -> list[torch.Tensor]:
        flags = keep[state.visual].reshape(-1, self._n_img_tokens)
        return [torch.nonzero(f).flatten().cpu() for f in flags]

    def _fill_flops(self, state: CallState, length: int, kept_len: int, b: int,
                    split_layer: int | None = None) -> None:
        st = state.stats
        vd, v_layers, v_tokens = self.family.vision_dims()
        ld, l_layers = self.family.llm_dims()
        vision = len(state.images) * v_layers * layer_flops(v_tokens, vd, causal=False)
        full = b * l_layers * layer_flops(length, ld, causal=True)
        k = 0 if split_layer is None else split_layer
        after = b * (k * layer_flops(length, ld, True) + (l_layers - k) * layer_flops(kept_len, ld, True))
        st.flops_before, st.flops_after = vision + full, vision + after

    # -- llm stage (FastV-like): score at layer K-1, drop from layer K --------------------------
    def _start_inner(self, state: CallState, kwargs: dict[str, Any], cache: Any):
        if cache is not None and getattr(cache, "is_compileable", False):
            raise UnsupportedCallError(
                f"{self.spec.name} drops tokens inside the LLM, which a static KV cache cannot hold; "
                "use the default DynamicCache (do not pass cache_implementation='static')")
        mask = kwargs.get("attention_mask")
        b, length = state.visual.shape
        if mask is not None and mask.dim() != 2:
            raise UnsupportedCallError(f"{self.spec.name} needs a 2D attention_mask (or none)")
        valid = mask.bool() if mask is not None else torch.ones(b, length, dtype=torch.bool,
                                                                device=state.visual.device)
        last = length - 1 - torch.argmax(torch.flip(valid.long(), dims=[1]), dim=1)
        state.fastv = {"valid": valid.to(state.visual.device), "last": last.to(state.visual.device),
                       "length": length}
        return None

    def _llm_attn_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state = self._state.get()
        if state is not None and state.fastv is not None and "idx" not in state.fastv:
            state.fastv["rope"] = kwargs.get("position_embeddings")

    def _llm_attn_post(self, la: Any):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            state = self._state.get()
            if state is None or state.fastv is None or "idx" in state.fastv:
                return
            t0 = time.perf_counter()
            self._select_inner(state, la)
            state.seconds += time.perf_counter() - t0
        return hook

    def _select_inner(self, state: CallState, la: Any) -> None:
        fv = state.fastv
        k = self.llm_layer - 1
        qk = state.qk.pop(k)
        b, length = state.visual.shape
        rows = torch.arange(b)
        last = fv["last"].cpu()
        q = qk["q"].reshape(b, length, la.num_heads, la.head_dim)[rows, last][:, None]  # [B, 1, H, d]
        kk = qk["k"].reshape(b, length, la.num_kv_heads, la.head_dim).transpose(1, 2)   # [B, Hkv, L, d]
        cos, sin = fv.pop("rope")
        cos, sin = cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:])
        q = la.rotary(q.transpose(1, 2), cos[rows, last][:, None], sin[rows, last][:, None])
        kk = la.rotary(kk, cos, sin)
        dev = kk.device
        valid = fv["valid"].to(dev) & (torch.arange(length, device=dev)[None] <= fv["last"].to(dev)[:, None])
        row = last_row_attention(q, kk, la.scaling, valid)                      # [B, L]
        visual = state.visual.to(dev)
        keep = ~visual
        n_img = self._n_img_tokens
        for r in range(b):
            pos = torch.nonzero(visual[r]).flatten().reshape(-1, n_img)
            for span in pos:
                kept = self.spec.select_llm(self.config, row[r, span[self._prefix:]], self._n_keep)
                keep[r, span[: self._prefix]] = True
                keep[r, span[self._prefix + kept]] = True
        self._fill_stats(state, keep, b)
        fv["keep"] = keep
        # rows must keep equal lengths: pad short rows with "ghost" tokens (dropped visual tokens
        # that stay in the sequence but are hidden as keys from every query)
        dropped = (visual & ~keep).sum(1)
        extra = dropped - dropped.min()
        ghost_full = torch.zeros_like(keep)
        for r in range(b):
            if int(extra[r]):
                cand = torch.nonzero(visual[r] & ~keep[r]).flatten()[: int(extra[r])]
                ghost_full[r, cand] = True
        keep_k = keep | ghost_full
        idx = left_packed_index(keep_k)
        ghost = torch.gather(ghost_full, 1, idx) if bool(ghost_full.any()) else None
        fv["idx"], fv["ghost"] = idx, ghost
        self._fill_flops(state, length, idx.shape[1], b, split_layer=self.llm_layer)
        if bool((visual & ~keep).any()):
            rec = PruneRecord(full_len=length, layer=self.llm_layer, idx_k=idx, ghost=ghost)
            state.pending = rec
            state.record = rec

    def _layer_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        state = self._state.get()
        if state is None:
            return None
        rec = state.record
        if rec is None or rec.idx_k is None:
            return None
        t0 = time.perf_counter()
        new = dict(kwargs)
        prefill = state.fastv is not None and state.fastv.get("idx") is rec.idx_k
        if prefill:
            idx = rec.idx_k
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == rec.full_len:  # layer K: later layers get the short output of K
                if self.spec.merge_llm is not None:
                    hidden = self._merge_inner(state, hidden)
                hidden = take(hidden, idx, 1, 0)
                if args:
                    args = (hidden,) + tuple(args[1:])
                else:
                    new["hidden_states"] = hidden
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                new["position_embeddings"] = tuple(self._memo(state, t, lambda x: take(x, idx, 1, 0)) for t in pe)
            if kwargs.get("position_ids") is not None:
                new["position_ids"] = self._memo(state, kwargs["position_ids"], lambda p: take_positions(p, idx))
            new["attention_mask"] = self._inner_mask_prefill(state, rec, kwargs.get("attention_mask"))
        else:
            hidden = args[0] if args else kwargs["hidden_states"]
            new["attention_mask"] = self._inner_mask_decode(state, rec, kwargs, hidden.shape[1])
        state.seconds += time.perf_counter() - t0
        return args, new

    def _merge_inner(self, state: CallState, hidden: torch.Tensor) -> torch.Tensor:
        """Merge each image's dropped tokens into its kept ones (HoliTom "M") before slicing at K."""
        keep = state.fastv["keep"].to(hidden.device)
        visual = state.visual.to(hidden.device)
        out = hidden.clone()
        for r in range(hidden.shape[0]):
            for span in torch.nonzero(visual[r]).flatten().reshape(-1, self._n_img_tokens):
                grid = span[self._prefix:]
                kept = torch.nonzero(keep[r, grid]).flatten()
                out[r, grid[kept]] = self.spec.merge_llm(self.config, hidden[r, grid], kept)  # type: ignore[misc]
        return out

    def _memo(self, state: CallState, t: torch.Tensor, fn) -> torch.Tensor:
        hit = state.memo.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        out = fn(t)
        state.memo[id(t)] = (t, out)
        return out

    def _inner_mask_prefill(self, state: CallState, rec: PruneRecord, mask: Any) -> Any:
        idx, ghost = rec.idx_k, rec.ghost
        if mask is None:
            if ghost is None:
                return None  # causal, no padding: the kernel's own causal path stays valid

            def causal(i: torch.Tensor) -> torch.Tensor:
                n = i.shape[1]
                m = torch.tril(torch.ones(n, n, dtype=torch.bool, device=i.device))
                return _mask_keys(m[None, None].expand(i.shape[0], 1, n, n), ghost, n)
            return self._memo(state, idx, causal)

        def build(m: torch.Tensor) -> torch.Tensor:
            if m.dim() == 2:
                out = take(m, idx, 1, 0)
            else:
                fill = _min_value(m)
                out = take(take(m, idx, 2, fill), idx, 3, fill)
            return _mask_keys(out, ghost, idx.shape[1]) if ghost is not None else out
        return self._memo(state, mask, build)

    def _inner_mask_decode(self, state: CallState, rec: PruneRecord, kwargs: dict[str, Any], q: int) -> Any:
        mask = kwargs.get("attention_mask")
        idx, ghost, full = rec.idx_k, rec.ghost, rec.full_len
        if mask is None:
            if ghost is None:
                return None
            kv = _seq_len(_cache_of(kwargs), rec.layer) + q
            m = torch.ones(idx.shape[0], 1, q, kv, dtype=torch.bool, device=idx.device)
            return _mask_keys(m, ghost, idx.shape[1])

        def build(m: torch.Tensor) -> torch.Tensor:
            fill = 0 if m.dim() == 2 else _min_value(m)
            out = torch.cat([take(m[..., :full], idx, m.dim() - 1, fill), m[..., full:]], dim=-1)
            return _mask_keys(out, ghost, idx.shape[1]) if ghost is not None else out
        return self._memo(state, mask, build)
