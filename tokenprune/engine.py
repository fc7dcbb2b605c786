"""The engine: installs native hooks on a model's instances, carries per-call state, and slices
the LLM's inputs (prefill and every decode step) and, for inner-LLM strategies, every later
decoder layer's hidden states, rotary cos/sin, position ids and masks.

Where selection happens is the family's choice: on the projector input (LLaVA-1.5), on the merger
output (Qwen), or at the LLM input in the packed placeholder layout (LLaVA-NeXT / OneVision,
``select_at_lm``); the budget of every image is split over its selection units (frame groups,
base crop and canvas). A vision-stage strategy may be stacked with an inner-LLM one.

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

from .attention import last_row_attention
from .config import PruneConfig
from .errors import ConfigError, UnsupportedCallError
from .family import Family, ImageLayout, Unit
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
    """The (encoding, image index) whose projector output rows are ``f`` (same storage or equal)."""
    for e in reversed(encoded):
        for i, row in enumerate(e.outputs):
            if row.data_ptr() == f.data_ptr() and row.shape == f.shape:
                return e, i
    for e in reversed(encoded):
        for i, row in enumerate(e.outputs):
            if row.shape == f.shape and torch.equal(row, f.to(row.device, row.dtype)):
                return e, i
    return None


def split_budget(total: int, sizes: list[int], weights: list[float] | None = None) -> list[int]:
    """Split ``total`` kept tokens over units of ``sizes`` tokens in proportion to ``weights``
    (default: evenly), largest remainder first (ties: the earlier unit); a unit never gets more than
    it has, the excess moves on to the others. Sums to ``min(total, sum(sizes))``."""
    w = [1.0] * len(sizes) if weights is None else [float(x) for x in weights]
    out = [0] * len(sizes)
    left, open_units = min(total, sum(sizes)), [i for i in range(len(sizes)) if sizes[i] > 0]
    while left > 0 and open_units:
        wsum = sum(w[i] for i in open_units) or float(len(open_units))
        exact = {i: left * (w[i] if wsum else 1.0) / wsum for i in open_units}
        give = {i: min(sizes[i] - out[i], int(exact[i])) for i in open_units}
        rest = left - sum(give.values())
        for i in sorted(open_units, key=lambda i: (-(exact[i] - int(exact[i])), i)):
            if rest <= 0:
                break
            if give[i] < sizes[i] - out[i]:
                give[i] += 1
                rest -= 1
        for i in open_units:
            out[i] += give[i]
            left -= give[i]
        open_units = [i for i in open_units if out[i] < sizes[i]]
        if rest > 0 and not any(give.values()):
            break
    return out


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
    inner_len: int = 0                     # inner-LLM: sequence length at the LLM input
    idx_k: torch.Tensor | None = None      # [B, L_K] kept positions at layer K
    ghost: torch.Tensor | None = None      # [B, L_K] True where a token only pads a row (masked key)


@dataclass
class ImageSel:
    """What was selected for one image (or video): ``keep`` [n_tokens] over its placeholder run
    (prefix included); ``groups`` (merging strategies) as :attr:`PruneStats.merge_groups`."""

    keep: torch.Tensor
    groups: torch.Tensor | None = None


@dataclass
class Span:
    """One image's (or video's) placeholder run in the LLM input: batch row and columns."""

    row: int
    cols: torch.Tensor
    modality: str


@dataclass
class VisionCall:
    """State of one vision-encoder + projector pass (may run before the forward that uses it:
    transformers 5.24's ``generate`` encodes images first and passes ``mm_encoder_outputs``)."""

    meta: Any = None
    scratch: dict[Any, Any] = field(default_factory=dict)   # the family's captured tensors
    scores: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    images: list[ImageSel] | None = None
    layouts: list[ImageLayout] | None = None
    seconds: float = 0.0


@dataclass
class Encoded:
    """A projector output and the selections made for its images, waiting to be scattered."""

    outputs: list[torch.Tensor]            # per image: its rows of the projector output
    images: list[ImageSel]
    seconds: float
    seq: int                               # increasing per handle: orders encodings and calls
    raw: Any = None                        # select-at-LLM families: (scores, projector output)


@dataclass
class CallState:
    visual: torch.Tensor | None = None                     # [B, L] placeholder mask (all modalities)
    spans: list[Span] = field(default_factory=list)        # images then videos, encoder order
    images: list[int] = field(default_factory=list)        # batch row of each span
    encoded_mark: int = 0                                  # first encoding seq of this call
    given: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # pre-encoded features
    from_forward: list[str] = field(default_factory=list)  # modalities encoded inside this call
    vision_segments: list[int] = field(default_factory=list)
    caller_positions: bool = True                          # position_ids came from the caller
    full_len: int = 0                                      # prompt length before any pruning
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
    """A strategy installed on one model. ``last_stats``, ``remove()``, context manager.

    At most one vision-stage strategy (``vspec``: selects before the LLM) and one inner-LLM
    strategy (``lspec``: drops from decoder layer K) are stacked; ``spec`` / ``config`` are the
    first of them. The inner stage then works on the tokens the outer one kept (of the modalities in
    ``inner_modalities``)."""

    def __init__(self, model: nn.Module, family: Family, spec: StrategySpec, config: PruneConfig,
                 inner: tuple[StrategySpec, PruneConfig] | None = None,
                 inner_modalities: frozenset[str] | None = None) -> None:
        self.model = model
        self.family = family
        self.spec = spec
        self.config = config
        if spec.stage == "llm":
            if inner is not None:
                raise ConfigError(f"{spec.name} already acts inside the LLM; stack it after a "
                                  "vision-stage strategy instead")
            inner, spec_v = (spec, config), None
        else:
            spec_v = (spec, config)
        if inner is not None and inner[0].stage != "llm":
            raise ConfigError(f"the inner strategy must act inside the LLM; {inner[0].name} acts before it")
        self.vspec, self.vconfig = spec_v if spec_v else (None, None)
        self.lspec, self.lconfig = inner if inner else (None, None)
        self.inner_modalities = inner_modalities
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
        if family.tokens_per_image is not None:   # fixed grid: check the budget now
            config.tokens_for(family.tokens_per_image)
        self.requests = self.vspec.requests(self.vconfig, info) if self.vspec else []
        self.llm_layer = self.lspec.llm_layer(self.lconfig, family.llm_info) if self.lspec else None
        #: layers whose attention rows are materialised (vision layers, and LLM layer K-1)
        self.scored_layers: list[tuple[str, int]] = sorted({("vision", r.layer) for r in self.requests})
        if self.llm_layer is not None:
            self.scored_layers.append(("llm", self.llm_layer - 1))

    # -- install / remove ------------------------------------------------------------------------
    def _add(self, h: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(h)

    def install(self) -> "PruneHandle":
        fam = self.family
        self._add(fam.outer.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
        self._add(fam.outer.register_forward_hook(self._outer_post, always_call=True))
        self._add(fam.language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self._add(fam.language_model.register_forward_hook(self._lm_post))
        if self.vspec is not None:
            kinds: dict[int, set[str]] = {}
            for r in self.requests:
                kinds.setdefault(r.layer, set()).add(r.kind)
            for layer, ks in kinds.items():
                for h in fam.install_vision_capture(layer, ks, self._store, self._scratch):
                    self._add(h)
            self._add(fam.vision_tower.register_forward_pre_hook(self._vision_pre, with_kwargs=True))
            sel = fam.selection_module
            if fam.select_at_lm:      # keep the scores; select at the LLM input (packed layout)
                self._add(sel.register_forward_hook(self._record_raw))
            elif fam.select_on_output:
                self._add(sel.register_forward_hook(self._selection_on_output))
            else:
                self._add(sel.register_forward_pre_hook(self._selection_on_input))
                self._add(sel.register_forward_hook(self._selection_post))
        if self.lspec is not None:
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
        fam = self.family
        state = CallState(caller_positions=kwargs.get("position_ids") is not None)
        masks = fam.placeholder_masks(args, kwargs)
        given_all = kwargs.get("mm_encoder_outputs") or {}
        # a modality counts only when the call carries its pixels or encodings: a placeholder id
        # in a decode step (or in text) is plain text to the model too
        masks = {m: v for m, v in masks.items() if v is not None and bool(v.any())
                 and (kwargs.get(fam.pixel_keys[m]) is not None or given_all.get(m) is not None)}
        if masks:
            state.visual = torch.stack(list(masks.values())).any(0)
            counts = fam.placeholder_counts(args, kwargs)
            if counts is None:
                n = fam.tokens_per_image
                per_row = masks["image"].sum(dim=1)
                if bool((per_row % n != 0).any()):
                    raise UnsupportedCallError(
                        f"visual placeholder counts per row {per_row.tolist()} are not multiples of "
                        f"{n} tokens per image")
                counts = {"image": [n] * (int(per_row.sum()) // n)}
            for m in fam.pixel_keys:
                if m in masks:
                    state.spans.extend(self._spans(masks[m], counts.get(m, []), m))
            state.images = [sp.row for sp in state.spans]
            state.vision_segments = fam.vision_segments(args, kwargs, counts)
            state.stats = PruneStats(strategy=self.spec.name if self.lspec is None or self.vspec is None
                                     else f"{self.vspec.name}+{self.lspec.name}")
            state.encoded_mark = self._seq
            for m, key in fam.pixel_keys.items():
                if m not in masks:
                    continue
                given = given_all.get(m)
                if given is not None and kwargs.get(key) is None:
                    state.given[m] = list(given.pooler_output)
                else:
                    state.from_forward.append(m)
        self._state.set(state)

    @staticmethod
    def _spans(mask: torch.Tensor, counts: list[int], modality: str) -> list[Span]:
        """Cut a modality's placeholders (row-major, the order ``masked_scatter`` fills) into runs."""
        pos = torch.nonzero(mask)
        if sum(counts) != pos.shape[0]:
            raise UnsupportedCallError(
                f"{pos.shape[0]} {modality} placeholder tokens in the prompt, but the {modality} inputs "
                f"give {sum(counts)} tokens ({counts})")
        spans, start = [], 0
        for c in counts:
            chunk = pos[start:start + c]
            start += c
            if bool((chunk[:, 0] != chunk[0, 0]).any()):
                raise UnsupportedCallError(f"a {modality}'s placeholder tokens span several batch rows")
            spans.append(Span(row=int(chunk[0, 0]), cols=chunk[:, 1].clone(), modality=modality))
        return spans

    def _outer_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._state.set(None)

    # -- attention capture --------------------------------------------------------------------
    def _capture(self, layer: int, which: str):
        """LLM layer K-1's q / k projection outputs (inner-LLM strategies, prefill only)."""
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            target = self._state.get()
            if target is None or target.fastv is None or "idx" in target.fastv:
                return
            target.qk.setdefault(layer, {})[which] = output
        return hook

    def _scratch(self) -> dict[Any, Any] | None:
        state = self._vision.get()
        return None if state is None else state.scratch

    def _store(self, layer: int, compute) -> None:
        """Called by the family's capture hooks once per scored vision layer and pass."""
        state = self._vision.get()
        if state is None:
            return
        t0 = time.perf_counter()
        for kind, value in compute().items():
            state.scores[(layer, kind)] = value
        state.seconds += time.perf_counter() - t0

    # -- vision stage: score in the encoder, select at the projector input --------------------
    def _vision_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._vision.set(VisionCall(meta=self.family.vision_begin(args, kwargs)))

    def _selection_on_input(self, module: nn.Module, args: tuple) -> tuple | None:
        state = self._vision.get()
        if state is None:
            return None
        new = self._select(state, args[0])
        return None if new is None else (new,) + tuple(args[1:])

    def _selection_post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        state = self._vision.get()
        self._vision.set(None)
        if state is None or state.images is None:
            return
        self._remember(state, output)

    def _selection_on_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        state = self._vision.get()
        self._vision.set(None)
        if state is None:
            return None
        new = self._select(state, output)
        out = output if new is None else new
        self._remember(state, out)
        return new

    def _record_raw(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        state = self._vision.get()
        self._vision.set(None)
        if state is None:
            return
        encoded = self._encoded()
        with self._lock:
            self._seq += 1
            seq = self._seq
        encoded.append(Encoded([], [], state.seconds, seq, raw=(dict(state.scores), output)))
        del encoded[:-MAX_PENDING]

    def _remember(self, state: VisionCall, output: torch.Tensor) -> None:
        t0 = time.perf_counter()
        outputs = self.family.image_outputs(output, state.layouts, state.meta)
        state.seconds += time.perf_counter() - t0
        encoded = self._encoded()
        with self._lock:
            self._seq += 1
            seq = self._seq
        encoded.append(Encoded(outputs, state.images, state.seconds, seq))
        del encoded[:-MAX_PENDING]

    def _select(self, state: VisionCall, x: torch.Tensor) -> torch.Tensor | None:
        """Select in every unit of every image of one pass; returns the tensor with merged
        features written in (None when no strategy merged)."""
        t0 = time.perf_counter()
        flat, layouts = self.family.vision_layout(x, state.scores, state.meta, per_frame=self.vspec.unit == "frame")
        state.scores.clear()
        state.images, merged = self._select_layouts(flat, layouts)
        state.layouts = layouts
        state.seconds += time.perf_counter() - t0
        return None if merged is None else self.family.vision_restore(merged, x, state.meta)

    def _select_layouts(self, flat: torch.Tensor, layouts: list[ImageLayout]
                        ) -> tuple[list[ImageSel], torch.Tensor | None]:
        """Budget every image over its units, select in every unit, write merged features into a
        copy of ``flat`` [R, D] (None when no strategy merged); one ImageSel per layout."""
        units: list[tuple[Unit, int]] = []
        for lay in layouts:
            sizes = [u.rows.numel() for u in lay.units]
            # a kept prefix (CLS) counts in the budget; layout tokens (newlines) do not
            total = self.vconfig.tokens_for(lay.prefix + sum(sizes)) - lay.prefix
            if total < 1:
                raise ConfigError(f"the budget must leave at least one visual token after the {lay.prefix} "
                                  f"prefix token(s); got {total + lay.prefix} of {lay.prefix + sum(sizes)}")
            units.extend(zip(lay.units, split_budget(total, sizes, [u.weight for u in lay.units])))
        sels = self._select_units(flat, units)
        merged = None
        for (u, n_keep), sel in zip(units, sels):
            if sel.indices.numel() != n_keep:
                raise RuntimeError(f"strategy {self.vspec.name} kept {sel.indices.numel()} tokens, "
                                   f"budget is {n_keep}")
            if sel.features is not None:
                if merged is None:
                    merged = flat.clone()
                merged[u.rows[sel.indices.to(u.rows.device)]] = sel.features.to(flat.device, flat.dtype)
        it = iter(sels)
        return [self._image_sel(lay, [next(it) for _ in lay.units]) for lay in layouts], merged

    def _select_units(self, flat: torch.Tensor, units: list[tuple[Unit, int]]) -> list[Selection]:
        """One strategy call per unit, or one batched call per group of same-shaped units."""
        info = self.family.vision_info
        out: list[Selection | None] = [None] * len(units)
        spec, cfg = self.vspec, self.vconfig
        if spec.select_batch is not None:
            groups: dict[tuple, list[int]] = {}
            for i, (u, n_keep) in enumerate(units):
                if u.frames == 1:
                    groups.setdefault((u.grid, n_keep), []).append(i)
            for (grid, n_keep), members in groups.items():
                if n_keep == 0:
                    continue
                feats = torch.stack([flat[units[i][0].rows] for i in members])
                scores = {key: torch.stack([units[i][0].scores[key] for i in members])
                          for key in units[members[0]][0].scores}
                batched = spec.select_batch(cfg, VisualTokens(grid=grid, features=feats, scores=scores),
                                                 n_keep, info)
                if batched is not None:
                    for i, sel in zip(members, batched):
                        out[i] = sel
        for i, (u, n_keep) in enumerate(units):
            if out[i] is None:
                if n_keep == 0:
                    out[i] = Selection(torch.zeros(0, dtype=torch.long, device=flat.device))
                    continue
                tokens = VisualTokens(grid=u.grid, features=flat[u.rows], scores=u.scores, frames=u.frames)
                out[i] = spec.select(cfg, tokens, n_keep, info)  # type: ignore[misc]
        return out  # type: ignore[return-value]

    @staticmethod
    def _image_sel(lay: ImageLayout, sels: list[Selection]) -> ImageSel:
        keep = torch.zeros(lay.n_tokens, dtype=torch.bool)
        keep[: lay.prefix] = True
        if lay.fixed is not None:
            keep[lay.fixed.cpu()] = True
        off, groups, kept_before = lay.prefix, [], 0
        for u, sel in zip(lay.units, sels):
            n = u.rows.numel()
            idx = sel.indices.cpu()
            if u.span_pos is not None:
                keep[u.span_pos.cpu()[idx]] = True
            else:
                keep[off + idx] = True
                off += n
            if sel.groups is not None:
                g = sel.groups.cpu().clone()
            else:
                g = torch.full((n,), -1, dtype=torch.long)
                g[idx] = torch.arange(idx.numel())
            groups.append(torch.where(g >= 0, g + kept_before, g))
            kept_before += idx.numel()
        merged = any(sel.groups is not None for sel in sels)
        return ImageSel(keep=keep, groups=torch.cat(groups) if merged else None)

    def _select_at_lm(self, state: CallState, embeds: torch.Tensor) -> tuple[list[ImageSel], torch.Tensor]:
        """Families whose placeholder layout is built after the projector (LLaVA-NeXT /
        OneVision: packed crops, unpadding, newline tokens): the family maps the encoder's scores
        onto the placeholder runs; selection runs on the LLM-input embeddings there."""
        t0 = time.perf_counter()
        fam = self.family
        encoded = self._encoded()
        raws: dict[str, list[Any]] = {}
        mine = iter([e for e in encoded if e.seq > state.encoded_mark and e.raw is not None])
        for m in state.from_forward:
            e = next(mine, None)
            if e is not None:
                raws[m] = [e.raw]
                state.seconds += e.seconds
        given = [m for m in fam.pixel_keys if m in state.given]
        earlier = [e for e in encoded if e.seq <= state.encoded_mark and e.raw is not None]
        earlier = earlier[-len(given):] if given else []
        if len(earlier) != len(given):
            raise UnsupportedCallError(
                "pre-computed image features (mm_encoder_outputs) were not produced by this patched model; "
                "pass pixel_values instead")
        for m, e in zip(given, earlier):
            raws[m] = [e.raw]
            state.seconds += e.seconds
        b, length, d = embeds.shape
        per_frame = self.vspec.unit == "frame"
        layouts: list[ImageLayout] = []
        for m in fam.pixel_keys:
            spans = [sp for sp in state.spans if sp.modality == m]
            if not spans:
                continue
            if m not in raws:
                raise UnsupportedCallError(f"no encoder pass was seen for the {m}s of this call")
            layouts.extend(fam.lm_layouts(m, spans, embeds, raws[m], per_frame))
        images, merged = self._select_layouts(embeds.reshape(b * length, d), layouts)
        for i, sp in enumerate(state.spans):
            if sp.modality == "image" and self.vspec.images == "keep":   # a video method: images pass whole
                images[i] = ImageSel(keep=torch.ones_like(images[i].keep))
        state.seconds += time.perf_counter() - t0
        return images, (embeds if merged is None else merged.reshape(b, length, d))

    def _encoded(self) -> list[Encoded]:
        """This thread's recent encodings (newest last)."""
        with self._lock:
            return self._encoded_by_thread.setdefault(threading.get_ident(), [])

    def _take_selections(self, state: CallState) -> list[ImageSel]:
        """Selections of the images / videos of this call, in span order."""
        encoded = self._encoded()
        mine = iter([e for e in encoded if e.seq > state.encoded_mark])  # encoded inside this call
        by_modality: dict[str, list[ImageSel]] = {}
        for m in state.from_forward:
            e = next(mine, None)
            if e is None:
                break
            by_modality[m] = e.images
            state.seconds += e.seconds
        for m, given in state.given.items():
            sels, used = [], set()
            for f in given:
                hit = _find_encoding(encoded, f)
                if hit is None:
                    raise UnsupportedCallError(
                        "pre-computed image features (mm_encoder_outputs) were not produced by this "
                        "patched model; pass pixel_values instead")
                e, i = hit
                sels.append(e.images[i])
                if id(e) not in used:
                    used.add(id(e))
                    state.seconds += e.seconds
            by_modality[m] = sels
        out: list[ImageSel] = []
        for m in self.family.pixel_keys:
            spans = [sp for sp in state.spans if sp.modality == m]
            got = by_modality.get(m, [])
            if len(got) != len(spans):
                raise UnsupportedCallError(f"{len(got)} encoded {m}s for {len(spans)} {m}s in the prompt")
            for sp, im in zip(spans, got):
                if im.keep.numel() != sp.cols.numel():
                    raise UnsupportedCallError(
                        f"an encoded {m} has {im.keep.numel()} tokens but its placeholder run has {sp.cols.numel()}")
            if m == "image" and self.vspec.images == "keep":   # a video method: images pass unchanged
                got = [ImageSel(keep=torch.ones_like(im.keep)) for im in got]
            out.extend(got)
        return out

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
            return args, self._decode_inputs(record, kwargs, cache, state.caller_positions)
        if record is not None or _seq_len(cache) > 0:
            raise UnsupportedCallError(
                "pruning a prefill that continues a non-empty KV cache is not supported; "
                "start a new generation for each prompt with images")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[:2] != state.visual.shape:
            raise UnsupportedCallError("the language model did not receive inputs_embeds of the prompt's shape")
        state.full_len = state.visual.shape[1]
        if self.vspec is None:
            return self._start_inner(state, kwargs, cache)
        new = self._prune_inputs(state, kwargs)
        if self.lspec is not None:
            self._follow_input_pruning(state)
            self._start_inner(state, new, cache)
        return args, new

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
        if self.family.select_at_lm:
            images, embeds = self._select_at_lm(state, embeds)
        else:
            images = self._take_selections(state)
        keep = ~visual
        for sp, im in zip(state.spans, images):
            keep[sp.row, sp.cols.to(visual.device)] = im.keep.to(visual.device)
        self._fill_stats(state, keep, b)
        assert state.stats is not None
        state.stats.merge_groups = [[] for _ in range(b)]
        for row, im in zip(state.images, images):
            state.stats.merge_groups[row].append(im.groups)
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
        self.family.prune_lm_kwargs(new, kwargs, keep, idx)
        state.pending = PruneRecord(full_len=length, idx=idx, dropped=dropped_mask.sum(1), compact=compact)
        state.seconds += time.perf_counter() - t0
        return new

    def _decode_inputs(self, rec: PruneRecord, kwargs: dict[str, Any], cache: Any,
                       caller_positions: bool = True) -> dict[str, Any]:
        """Decode step after an input-level prune: re-slice the full-length 2D mask and keep
        positions consistent with the prefill's numbering (original or compact).

        Positions given by the caller (``generate``) follow the unpruned numbering; positions the
        model derives from the (shorter) cache itself, as Qwen's ``rope_deltas`` path does, follow
        the pruned one."""
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
        elif rec.compact == caller_positions:
            d = rec.dropped.to(pos.device)
            d = d[:, None] if pos.dim() == 2 else d[None, :, None]
            new["position_ids"] = pos - d if rec.compact else pos + d
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
        return [torch.nonzero(keep[sp.row, sp.cols.to(keep.device)]).flatten().cpu() for sp in state.spans]

    def _fill_flops(self, state: CallState, length: int, kept_len: int, b: int,
                    split_layer: int | None = None) -> None:
        st = state.stats
        vd, v_layers, _ = self.family.vision_dims()
        ld, l_layers = self.family.llm_dims()
        vision = v_layers * sum(layer_flops(n, vd, causal=False) for n in state.vision_segments)
        full = b * l_layers * layer_flops(state.full_len or length, ld, causal=True)
        k = 0 if split_layer is None else split_layer
        after = b * (k * layer_flops(length, ld, True) + (l_layers - k) * layer_flops(kept_len, ld, True))
        st.flops_before, st.flops_after = vision + full, vision + after

    # -- llm stage (FastV-like): score at layer K-1, drop from layer K --------------------------
    def _start_inner(self, state: CallState, kwargs: dict[str, Any], cache: Any):
        if cache is not None and getattr(cache, "is_compileable", False):
            raise UnsupportedCallError(
                f"{self.lspec.name} drops tokens inside the LLM, which a static KV cache cannot hold; "
                "use the default DynamicCache (do not pass cache_implementation='static')")
        mask = kwargs.get("attention_mask")
        b, length = state.visual.shape
        if mask is not None and mask.dim() != 2:
            raise UnsupportedCallError(f"{self.lspec.name} needs a 2D attention_mask (or none)")
        valid = mask.bool() if mask is not None else torch.ones(b, length, dtype=torch.bool,
                                                                device=state.visual.device)
        last = length - 1 - torch.argmax(torch.flip(valid.long(), dims=[1]), dim=1)
        state.fastv = {"valid": valid.to(state.visual.device), "last": last.to(state.visual.device),
                       "length": length, "fixed": self.family.structural(state.spans, kwargs["inputs_embeds"])}
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
        p = self._prefix
        for sp, fixed in zip(state.spans, fv["fixed"]):
            span = sp.cols.to(dev)
            if not self._inner_applies(sp):
                keep[sp.row, span] = True
                continue
            cand = torch.ones(span.numel(), dtype=torch.bool, device=dev)
            cand[:p] = False
            cand[fixed.to(dev)] = False             # layout tokens: kept, not in the budget
            content = span[cand]
            n_keep = self.lconfig.tokens_for(content.numel() + p) - p   # a kept CLS prefix counts, as before the LLM
            kept = self.lspec.select_llm(self.lconfig, row[sp.row, content], n_keep)
            keep[sp.row, span[~cand]] = True
            keep[sp.row, content[kept]] = True
        if self.vspec is None:
            self._fill_stats(state, keep, b)
        else:  # stacked: stats describe the LLM input; the inner stage adds its own counts
            st = state.stats
            st.inner_tokens_kept = (visual & keep).sum(1).tolist()
            st.inner_kept_indices = [[] for _ in range(b)]
            for sp in state.spans:
                st.inner_kept_indices[sp.row].append(torch.nonzero(keep[sp.row, sp.cols.to(dev)]).flatten().cpu())
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
            rec = state.pending or PruneRecord(full_len=length)   # stacked: extend the input record
            rec.inner_len, rec.layer, rec.idx_k, rec.ghost = length, self.llm_layer, idx, ghost
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
            if hidden.shape[1] == rec.inner_len:  # layer K: later layers get the short output of K
                if self.lspec.merge_llm is not None:
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
        out = hidden.clone()
        for sp, fixed in zip(state.spans, state.fastv["fixed"]):
            if not self._inner_applies(sp):
                continue
            cand = torch.ones(sp.cols.numel(), dtype=torch.bool)
            cand[: self._prefix] = False
            cand[fixed] = False
            r, grid = sp.row, sp.cols[cand].to(hidden.device)
            kept = torch.nonzero(keep[r, grid]).flatten()
            out[r, grid[kept]] = self.lspec.merge_llm(self.lconfig, hidden[r, grid], kept)  # type: ignore[misc]
        return out

    def _inner_applies(self, sp: Span) -> bool:
        return self.inner_modalities is None or sp.modality in self.inner_modalities

    def _follow_input_pruning(self, state: CallState) -> None:
        """After input pruning, express the placeholder mask and the spans in the pruned sequence
        (what the inner stage sees), keeping only the kept tokens of each span."""
        rec = state.pending
        if rec is None or rec.idx is None:
            return
        idx = rec.idx
        b, n = idx.shape
        inv = torch.full((b, state.visual.shape[1]), -1, dtype=torch.long, device=idx.device)
        rows = torch.arange(b, device=idx.device)[:, None].expand(b, n)
        valid = idx >= 0
        inv[rows[valid], idx[valid]] = torch.arange(n, device=idx.device)[None].expand(b, n)[valid]
        for sp in state.spans:
            new = inv[sp.row, sp.cols.to(idx.device)]
            sp.cols = new[new >= 0]
        state.visual = take(state.visual, idx, 1, False)

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
        idx, ghost, full = rec.idx_k, rec.ghost, rec.inner_len
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
