"""The engine: installs native hooks on a model's instances, carries per-call state, and slices
the LLM's inputs (prefill and every decode step) and, for inner-LLM strategies, every later
decoder layer's hidden states, rotary cos/sin, position ids and masks.

Where selection happens is the family's choice: on the projector input (LLaVA-1.5), on the merger
output (Qwen), or at the LLM input in the packed placeholder layout (LLaVA-NeXT / OneVision,
``select_at_lm``); the budget of every image is split over its selection units (frame groups,
base crop and canvas). A vision-stage strategy may be stacked with an inner-LLM one; the
inner-LLM stage's hooks live in :mod:`tokenprune.inner` (a mixin of the handle), the pure
sequence helpers (gather with padding, ghost-key masks, budget splits) in :mod:`tokenprune.sequence`,
the state dataclasses in :mod:`tokenprune.state`.

Per-call state lives in a ``ContextVar`` (one per handle), so two threads calling the same
patched model never see each other's tensors; what a thread reads back (``last_stats``, its
recent encodings, the selection an uncached generation keeps) is thread-local, so it is its own
call's and goes away with the thread. State that must outlive one forward call (what was kept at
prefill, needed by every decode step) is keyed by the KV-cache object of that generation in a
weak dictionary, never stored on modules.
"""
from __future__ import annotations

import contextvars
import copy
import logging
import threading
import warnings
import weakref
from functools import partial
from typing import Any

import torch
from torch import nn

from . import _handles
from .config import PruneConfig
from .errors import ConfigError, TokenPruneError, TokenPruneWarning, UnsupportedCallError, UnsupportedModelError
from .family import Family, ImageLayout, Unit
from .inner import Q_SIGNALS, QK_SIGNALS, InnerStage
from .sequence import cache_of, left_packed_index, output_cache, padding_mask, seq_len, split_budget, take, take_positions, true_positions
from .state import CallState, Continuation, Encoded, ImageSel, LabelsCall, PruneRecord, Span, VisionCall, clock
from .stats import PruneStats, layer_flops
from .strategies.base import Selection, StrategySpec, VisualTokens

log = logging.getLogger("tokenprune")

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


def _first_equal(items: list[torch.Tensor], by_value: bool = False) -> list[int]:
    """For each item, the index of the first item that is the same tensor (``by_value``: or equal
    to it). generate's copies of a prompt's encodings are the same objects when they come as a
    list, copies by value when they come as one stacked tensor."""
    out: list[int] = []
    for j, f in enumerate(items):
        hit = next((i for i in sorted(set(out)) if items[i] is f or (items[i].shape == f.shape and (
            items[i].data_ptr() == f.data_ptr() or (by_value and torch.equal(items[i], f))))), j)
        out.append(hit)
    return out


def _rebase(lay: ImageLayout, sp: Span, length: int) -> ImageLayout:
    """``lay`` (laid out for an equal run elsewhere) moved onto placeholder run ``sp``."""
    flat = sp.row * length + sp.cols
    units = []
    for u in lay.units:
        assert u.span_pos is not None, "only layouts whose units give span_pos can be moved"
        units.append(Unit(rows=flat[u.span_pos.to(flat.device)].to(u.rows.device), grid=u.grid, scores=u.scores,
                          frames=u.frames, span_pos=u.span_pos, weight=u.weight))
    return ImageLayout(prefix=lay.prefix, units=units, fixed=lay.fixed, length=lay.length)


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
        self.model: Any = model
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
        self.vspec: StrategySpec[Any] | None = spec_v[0] if spec_v else None
        self.vconfig: Any = spec_v[1] if spec_v else None
        self.lspec: StrategySpec[Any] | None = inner[0] if inner else None
        self.lconfig: Any = inner[1] if inner else None
        self.inner_modalities = inner_modalities
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._fresh_state()
        self._seq = 0
        self._removed = False
        info = family.vision_info
        self._prefix = family.num_prefix
        if family.tokens_per_image is not None:   # fixed grid: check the budget now
            config.tokens_for(family.tokens_per_image)
        self.requests = (self.vspec.requests(self.vconfig, info)
                         if self.vspec is not None and self.vspec.requests is not None else [])
        #: inner-LLM stages: the first decoder layer of each (K_0 < K_1 < ...); ``llm_layer`` = K_0
        self.llm_layers: list[int] = self._stage_layers()
        self.llm_layer: int | None = self.llm_layers[0] if self.llm_layers else None
        #: per stage, the decoder layer whose q/k give its signals (K_s-1, or the family's nearest
        #: full-attention layer below it in a hybrid LLM)
        self.score_layers: list[int] = [family.llm_scoring_layer(k - 1) for k in self.llm_layers]
        #: layers whose attention rows / keys are materialised (vision layers, LLM layers K_s-1)
        self.scored_layers: list[tuple[str, int]] = sorted({("vision", r.layer) for r in self.requests})
        if self.lspec is not None and self.lspec.llm_signals & QK_SIGNALS:
            self.scored_layers += [("llm", j) for j in self.score_layers]
        self.modules: list[nn.Module] = []   #: what the install hooks (set by :meth:`preflight`)
        #: the inner-LLM stage (its hooks are installed only with an inner strategy)
        self.inner_stage = InnerStage(self)

    def _stage_layers(self) -> list[int]:
        if self.lspec is None or self.lspec.llm_layer is None:
            return []
        got = self.lspec.llm_layer(self.lconfig, self.family.llm_info)
        layers = [got] if isinstance(got, int) else [int(k) for k in got]
        n = self.family.llm_info.num_layers
        if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 1 or layers[-1] >= n:
            raise ConfigError(f"{self.lspec.name}: stage layers {layers} must increase within 1..{n - 1} "
                              f"(an LLM of {n} layers)")
        return layers

    def _fresh_state(self) -> None:
        """Per-handle containers that are never shared with a copy (context variables, locks,
        thread-local storage, records keyed by caches)."""
        self._state: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
            f"tokenprune_state_{id(self)}", default=None)
        self._vision: contextvars.ContextVar[VisionCall | None] = contextvars.ContextVar(
            f"tokenprune_vision_{id(self)}", default=None)
        self._labels: contextvars.ContextVar[LabelsCall | None] = contextvars.ContextVar(
            f"tokenprune_labels_{id(self)}", default=None)
        # per thread: last_stats, recent encodings (generate in transformers >= 5.24 encodes images
        # before the forward calls that use them, and with use_cache=False reuses them on every
        # step) and the selection an uncached generation keeps; freed when the thread ends
        self._local = threading.local()
        self._lock = threading.Lock()
        self._records: "weakref.WeakKeyDictionary[Any, PruneRecord]" = weakref.WeakKeyDictionary()

    @property
    def vs(self) -> StrategySpec[Any]:
        """The vision-stage spec (only called on the vision path, where there is one)."""
        assert self.vspec is not None
        return self.vspec

    @property
    def last_stats(self) -> PruneStats | None:
        """Stats of the calling thread's last forward / generate call with visual tokens (None
        before the first); another thread's calls never show here."""
        st = getattr(self._local, "stats", None)
        return None if st is None else st.resolve()

    def __deepcopy__(self, memo: dict[int, Any]) -> "PruneHandle":
        """``copy.deepcopy(model)`` copies the hooks and so this handle: the copy is patched with a
        handle of its own (``tokenprune.get_handle(copy)``), bound to the copied modules; it starts
        with no stats, records or encodings. Specs and configs are immutable and shared."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        shared = {"spec", "config", "vspec", "vconfig", "lspec", "lconfig", "requests"}
        skip = {"_state", "_vision", "_labels", "_local", "_lock", "_records"}
        for key, value in self.__dict__.items():
            if key in skip:
                continue
            new.__dict__[key] = value if key in shared else copy.deepcopy(value, memo)
        new._fresh_state()
        if not new._removed:
            _handles.adopt(new)
        return new

    # -- install / remove ------------------------------------------------------------------------
    def _add(self, h: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(h)

    def hooked_modules(self) -> list[nn.Module]:
        """Every module this handle installs a hook on (checked before anything is installed)."""
        fam = self.family
        mods = [fam.model, fam.outer, fam.language_model]
        if self.vspec is not None:
            mods += [fam.vision_tower, fam.selection_module]
            for layer in sorted({r.layer for r in self.requests}):
                mods += fam.vision_capture_modules(layer)
        if self.lspec is not None:
            for j in self.score_layers:
                la = fam.llm_attention(j)
                mods += [la.q_source, la.k_source, la.module]
            mods += list(fam.decoder_layers[self.llm_layers[0]:])
        return mods

    def preflight(self) -> list[nn.Module]:
        """Resolve every module the install needs and check it can take a hook, touching nothing.
        Raises :class:`UnsupportedModelError` naming what is missing."""
        try:
            mods = self.hooked_modules()
        except TokenPruneError:
            raise
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} does not have the layout family {self.family.name!r} expects "
                f"for {self.spec.name}: {type(e).__name__}: {e}") from e
        for m in mods:
            if not isinstance(m, nn.Module):
                raise UnsupportedModelError(
                    f"family {self.family.name!r} resolved a {type(m).__name__} where a module was expected")
        self.modules = mods
        return mods

    def install(self) -> "PruneHandle":
        """Install every hook, or none: on any failure the hooks added so far are removed and the
        error is raised as a :class:`TokenPruneError`."""
        try:
            self._install()
            if log.isEnabledFor(logging.DEBUG):
                names = {id(m): n for n, m in self.model.named_modules()}
                log.debug("installed %s on %s (family %s): %d hooks on %s; scored layers %s", self.spec.name,
                          type(self.model).__name__, self.family.name, len(self._hooks),
                          sorted({names.get(id(m), type(m).__name__) for m in self.modules}), self.scored_layers)
        except BaseException as e:   # an interrupt mid-install must not leave hooks either
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._removed = True
            if isinstance(e, TokenPruneError) or not isinstance(e, Exception):
                raise
            raise UnsupportedModelError(
                f"installing {self.spec.name} on {type(self.model).__name__} failed and was rolled back: "
                f"{type(e).__name__}: {e}") from e
        return self

    def _install(self) -> None:
        fam = self.family
        self._add(fam.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self._add(fam.model.register_forward_hook(self._top_post, with_kwargs=True, always_call=True))
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
            elif self.vspec.text:     # the instruction is known only at the LLM input: select there
                self._add(sel.register_forward_hook(self._record_deferred))
            elif fam.select_on_output or self.vspec.features == "llm":   # LLM-space features: after the projector
                self._add(sel.register_forward_hook(self._selection_on_output))
            else:
                self._add(sel.register_forward_pre_hook(self._selection_on_input))
                self._add(sel.register_forward_hook(self._selection_post))
        if self.lspec is not None:
            stage, sig = self.inner_stage, self.lspec.llm_signals
            for j in sorted(set(self.score_layers)) if sig & QK_SIGNALS else []:
                la = fam.llm_attention(j)
                if sig & Q_SIGNALS:
                    self._add(la.q_source.register_forward_hook(partial(stage.capture, j, "q")))
                self._add(la.k_source.register_forward_hook(partial(stage.capture, j, "k")))
                self._add(la.module.register_forward_pre_hook(partial(stage.attn_pre, j), with_kwargs=True))
            for i, layer in enumerate(fam.decoder_layers):
                if i >= self.llm_layers[0]:
                    self._add(layer.register_forward_pre_hook(partial(stage.layer_pre, i), with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before ``apply``."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._fresh_state()
        self._removed = True
        _handles.forget(self.model, self)

    @property
    def active(self) -> bool:
        return not self._removed

    def __enter__(self) -> "PruneHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PruneHandle({self.config!r}, family={self.family.name!r}, active={self.active})"

    # -- top-level model: labels ---------------------------------------------------------------
    def _top_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        """Take ``labels`` out of the call: the loss is computed after the forward on the labels
        sliced like the sequence (the model's own loss would see a length mismatch)."""
        labels = kwargs.get("labels")
        if labels is None:
            self._labels.set(None)
            return None
        extra: dict[str, Any] = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        self._labels.set(LabelsCall(labels=labels, extra=extra))
        new = dict(kwargs)
        new["labels"] = None
        return args, new

    def _top_post(self, module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        lc = self._labels.get()
        self._labels.set(None)
        if lc is None:
            return None
        as_tuple = isinstance(output, tuple)
        logits = output[0] if as_tuple else getattr(output, "logits", None)
        if logits is None:
            return None
        if logits.shape[1] != lc.labels.shape[1]:
            raise UnsupportedCallError(
                f"labels of length {lc.labels.shape[1]} do not match the {logits.shape[1]} logits "
                "(pass logits_to_keep=0 with labels)")
        vocab = module.config.get_text_config().vocab_size
        loss = module.loss_function(logits=logits, labels=lc.labels.to(logits.device), vocab_size=vocab, **lc.extra)
        if as_tuple:                  # return_dict=False: the model's own order, loss first
            return (loss,) + tuple(output)
        output["loss"] = loss
        return None

    def _slice_labels(self, idx: torch.Tensor, ghost: torch.Tensor | None = None) -> None:
        """Follow a gather of the sequence: positions that are new padding (or ghosts) predict nothing."""
        lc = self._labels.get()
        if lc is None:
            return
        labels = take(lc.labels, idx, 1, -100)
        if ghost is not None:
            labels = labels.masked_fill(ghost.to(labels.device), -100)
        lc.labels = labels

    # -- outer model: start / end of one call ---------------------------------------------------
    def _outer_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        fam = self.family
        cache = cache_of(kwargs)
        # "uncached": a generation step without a cache (generate passes use_cache=False); a plain
        # forward without a cache is a prefill of its own
        state = CallState(caller_positions=kwargs.get("position_ids") is not None,
                          uncached=cache is None and kwargs.get("use_cache") is False)
        masks = fam.placeholder_masks(args, kwargs)
        given_all = kwargs.get("mm_encoder_outputs") or {}
        # a modality counts only when the call carries its pixels or encodings: a placeholder id
        # in a decode step (or in text) is plain text to the model too
        # (no ``mask.any()``: a call carrying a modality's pixels has its placeholders, or the
        # model itself refuses it; reading the mask would be a host sync per call)
        masks = {m: v for m, v in masks.items() if v is not None
                 and (kwargs.get(fam.pixel_keys[m]) is not None or given_all.get(m) is not None)}
        trimmed = None
        if cache is not None and cache in self._records and seq_len(cache) == 0:
            del self._records[cache]          # reset / cropped to nothing: a new generation
        if not masks:
            record = self._records.get(cache) if cache is not None else None
            if record is not None:
                trimmed = self._continue_record(record, cache, args, kwargs)
        if masks:
            self._refuse_before_running(cache, kwargs)
            self._warn_long(masks)
            state.visual = torch.stack(list(masks.values())).any(0)
            counts = fam.placeholder_counts(args, kwargs)
            n_fixed = fam.fixed_grid_images(kwargs) if counts is None else None
            if counts is None and n_fixed is not None and state.visual.shape[0] == 1:
                # one row of fixed-grid images: the counts are the inputs' shape (no host sync;
                # the model checks its placeholders against its features itself)
                assert fam.tokens_per_image is not None
                counts = {"image": [fam.tokens_per_image] * n_fixed}
            if counts is None:
                n = fam.tokens_per_image
                assert n is not None, "a family with images of any size must give placeholder_counts"
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
                                     else f"{self.vs.name}+{self.lspec.name}")
            state.encoded_mark = self._seq
            for m, key in fam.pixel_keys.items():
                if m not in masks:
                    continue
                given = given_all.get(m)
                if given is not None and kwargs.get(key) is None:
                    state.given[m] = list(given.pooler_output)
                else:
                    state.from_forward.append(m)
            if state.uncached and self._keeps_prefill_choice and kwargs.get("use_cache") is False:
                state.continuation = self._uncached_continuation(args, kwargs)
            state.ids = fam.input_ids(args, kwargs)
        self._state.set(state)
        return trimmed

    def _refuse_before_running(self, cache: Any, kwargs: dict[str, Any]) -> None:
        """Typed refusals of generation modes pruning cannot serve, before any layer runs."""
        if cache is not None and seq_len(cache) > 0:   # (a record of an emptied cache was dropped)
            raise UnsupportedCallError(
                "pruning images in a call that continues a non-empty KV cache is not supported (a "
                "new image in a later turn); start a new generation over the whole conversation")
        if self.lspec is not None and cache is not None and getattr(cache, "is_compileable", False):
            raise UnsupportedCallError(
                f"{self.lspec.name} drops tokens inside the LLM, so layers >= {self.llm_layer} hold fewer "
                "tokens than the static KV cache's slot layout shared by all layers; use the default "
                "DynamicCache (do not pass cache_implementation='static'), or a vision-stage strategy")

    def _warn_long(self, masks: dict[str, torch.Tensor]) -> None:
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        length = next(iter(masks.values())).shape[1]
        if limit is not None and length > limit:
            warnings.warn(
                f"the prompt has {length} tokens, more than the model's max_position_embeddings={limit}: "
                "positions past it were never trained and answers are likely garbage", TokenPruneWarning,
                stacklevel=2)

    def _continue_record(self, rec: PruneRecord, cache: Any, args: tuple, kwargs: dict[str, Any]):
        """A call that continues a generation whose prompt was pruned before the LLM.

        ``generate`` slices a continuation (a second turn passing the first turn's cache with the
        whole conversation's ``input_ids``) at ``cache.get_seq_length()``, which lags the sequence
        by the tokens pruning took out: the chunk then starts with ``rec.offset`` tokens already in
        the cache. Recognised by the full-length 2D mask when there is one, else by the chunk
        re-sending the ids the cache ended with; those tokens are trimmed from every per-token
        argument. Returns new (args, kwargs), or None when the chunk is already right."""
        ids = self.family.input_ids(args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            return None
        q, off = x.shape[1], rec.offset
        past = seq_len(cache)
        mask = kwargs.get("attention_mask")
        stale = False
        if off > 0 and q > 1:
            pos = kwargs.get("position_ids")
            first = None                 # the chunk's first text position, where the caller gives it
            if torch.is_tensor(pos) and (pos.dim() == 2 or (pos.dim() == 3 and pos.shape[0] == 4)):
                first = int(pos.reshape(-1, pos.shape[-1])[0, 0])   # one sync, continuation calls only
            if torch.is_tensor(mask) and mask.dim() == 2:
                stale = mask.shape[1] - q == past
                if not stale and mask.shape[1] - q != past + off:
                    raise UnsupportedCallError(
                        f"the attention_mask covers {mask.shape[1]} tokens, but the pruned cache holds "
                        f"{past + off} (in unpruned numbering) and the call adds {q}")
            elif first is not None and first in (past, past + off):     # no mask: no padding either
                stale = first == past
            elif ids is not None and rec.tail is not None and rec.tail.shape[1] == off and q > off:
                stale = torch.equal(ids[:, :off].to(rec.tail.device), rec.tail)
            if stale and q <= off:
                raise UnsupportedCallError(
                    f"this continuation chunk of {q} tokens lies wholly in the pruned cache (it lags the "
                    f"sequence by {off} pruned tokens); pass prefill_chunk_size=None, or feed only the new tokens")
        if not stale:
            self._extend_tail(rec, ids)
            return None
        new = dict(kwargs)
        if ids is not None and "input_ids" in kwargs:
            new["input_ids"] = ids[:, off:]
        if embeds is not None:
            new["inputs_embeds"] = embeds[:, off:]
        for key in ("position_ids", "mm_token_type_ids", "token_type_ids"):
            v = kwargs.get(key)
            if torch.is_tensor(v) and v.shape[-1] == q:
                new[key] = v[..., off:]
        new_args = args
        if args and ids is not None and "input_ids" not in kwargs:
            new_args = (ids[:, off:],) + tuple(args[1:])
        self._extend_tail(rec, ids[:, off:] if ids is not None else None)
        return new_args, new

    @staticmethod
    def _extend_tail(rec: PruneRecord, ids: torch.Tensor | None) -> None:
        """Keep the last ``rec.offset`` consumed ids (no host sync: a concatenation per call)."""
        if ids is None:               # an embeddings-only call: what the cache ends with is unknown
            rec.tail = None
        elif rec.tail is not None:
            rec.tail = torch.cat([rec.tail, ids.to(rec.tail.device)], 1)[:, -rec.offset:]

    def _uncached_continuation(self, args: tuple, kwargs: dict[str, Any]) -> Continuation | None:
        """``use_cache=False`` generation re-runs the whole sequence each step with the same visual
        inputs (the same tensor objects). An uncached call whose ids start with the previous
        uncached call's prompt on this thread, with the same visual inputs, continues it and keeps
        its inner-LLM selection (as the cached path does); anything else starts afresh."""
        ids = self.family.input_ids(args, kwargs)
        fam = self.family
        given = kwargs.get("mm_encoder_outputs") or {}
        visual = tuple(x for m in fam.pixel_keys
                       for x in (kwargs.get(fam.pixel_keys[m]), getattr(given.get(m), "pooler_output", None))
                       if x is not None)
        prev: Continuation | None = getattr(self._local, "continuation", None)
        if ids is None:
            self._local.continuation = None
            return None
        if (prev is not None and (prev.keeps or self.lspec is None) and ids.shape[0] == prev.prompt.shape[0]
                and ids.shape[1] > prev.prompt.shape[1] and len(visual) == len(prev.visual)
                and all(a is b for a, b in zip(visual, prev.visual))
                and torch.equal(ids[:, :prev.prompt.shape[1]], prev.prompt.to(ids.device))):
            return prev
        self._local.continuation = Continuation(prompt=ids, visual=visual)
        return None

    def _outer_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._state.set(None)

    @staticmethod
    def _spans(mask: torch.Tensor, counts: list[int], modality: str) -> list[Span]:
        """Cut a modality's placeholders (row-major, the order ``masked_scatter`` fills) into runs.
        One row: the counts say how many there are, so their positions come from a sort (no host
        sync; a count that does not match the placeholders is refused by the model itself)."""
        if mask.shape[0] == 1:
            cols = true_positions(mask[0], sum(counts))
            out, start = [], 0
            for c in counts:
                out.append(Span(row=0, cols=cols[start:start + c], modality=modality))
                start += c
            return out
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

    # -- attention capture --------------------------------------------------------------------
    def _scratch(self) -> dict[Any, Any] | None:
        state = self._vision.get()
        return None if state is None else state.scratch

    def _store(self, layer: int, compute) -> None:
        """Called by the family's capture hooks once per scored vision layer and pass."""
        state = self._vision.get()
        if state is None:
            return
        t0 = clock()
        for kind, value in compute().items():
            state.scores[(layer, kind)] = value
        state.seconds += clock() - t0

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

    def _record_deferred(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """An instruction-conditioned strategy: lay the pass out now, select at the LLM input."""
        state = self._vision.get()
        self._vision.set(None)
        if state is None:
            return
        t0 = clock()
        flat, layouts = self.family.vision_layout(output, state.scores, state.meta, per_frame=self.vs.unit == "frame")
        state.scores.clear()
        outputs = self.family.image_outputs(output, layouts, state.meta)
        state.seconds += clock() - t0
        encoded = self._encoded()
        with self._lock:
            self._seq += 1
            seq = self._seq
        encoded.append(Encoded(outputs, [], state.seconds, seq, deferred=(flat, layouts)))
        del encoded[:-MAX_PENDING]

    @property
    def _keeps_prefill_choice(self) -> bool:
        """Whether an uncached generation must keep its first call's choice: inner stages, and
        instruction-conditioned selections (later steps' sequences hold generated text too)."""
        return self.lspec is not None or (self.vspec is not None and self.vspec.text)

    def _instruction(self, state: CallState, sp: Span, embeds: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """[T, D] LLM-input embeddings of the text after a placeholder run in its row (of the
        prompt: an uncached generation step's generated tokens are not part of the instruction)."""
        assert state.visual is not None
        row = sp.row
        pos = torch.arange(embeds.shape[1], device=embeds.device)
        ok = (pos > sp.cols.max().to(embeds.device)) & ~state.visual[row].to(embeds.device)
        if state.continuation is not None:
            ok &= pos < state.continuation.prompt.shape[1]
        if valid is not None:
            ok &= valid[row].to(embeds.device).bool()
        return embeds[row, ok]

    def _deferred_sel(self, e: Encoded, i: int, text: torch.Tensor) -> ImageSel:
        assert e.deferred is not None
        flat, layouts = e.deferred
        images, merged = self._select_layouts(flat, [layouts[i]], texts=[text])
        if merged is not None:
            raise RuntimeError(f"{self.vs.name} reads the instruction (text=True) and must not merge features")
        return images[0]

    def _remember(self, state: VisionCall, output: torch.Tensor) -> None:
        t0 = clock()
        assert state.layouts is not None and state.images is not None
        outputs = self.family.image_outputs(output, state.layouts, state.meta)
        state.seconds += clock() - t0
        encoded = self._encoded()
        with self._lock:
            self._seq += 1
            seq = self._seq
        encoded.append(Encoded(outputs, state.images, state.seconds, seq))
        del encoded[:-MAX_PENDING]

    def _select(self, state: VisionCall, x: torch.Tensor) -> torch.Tensor | None:
        """Select in every unit of every image of one pass; returns the tensor with merged
        features written in (None when no strategy merged)."""
        t0 = clock()
        flat, layouts = self.family.vision_layout(x, state.scores, state.meta, per_frame=self.vs.unit == "frame")
        state.scores.clear()
        state.images, merged = self._select_layouts(flat, layouts)
        state.layouts = layouts
        state.seconds += clock() - t0
        return None if merged is None else self.family.vision_restore(merged, x, state.meta)

    def _select_layouts(self, flat: torch.Tensor, layouts: list[ImageLayout],
                        texts: list[torch.Tensor] | None = None) -> tuple[list[ImageSel], torch.Tensor | None]:
        """Budget every image over its units, select in every unit, write merged features into a
        copy of ``flat`` [R, D] (None when no strategy merged); one ImageSel per layout.
        ``texts``: per layout, the instruction its units' selections read."""
        units: list[tuple[Unit, int]] = []
        unit_texts: list[torch.Tensor | None] = []
        for j, lay in enumerate(layouts):
            sizes = [u.rows.numel() for u in lay.units]
            # a kept prefix (CLS) counts in the budget; layout tokens (newlines) do not
            total = self.vconfig.tokens_for(lay.prefix + sum(sizes)) - lay.prefix
            if total < 1:
                raise ConfigError(f"the budget must leave at least one visual token after the {lay.prefix} "
                                  f"prefix token(s); got {total + lay.prefix} of {lay.prefix + sum(sizes)}")
            units.extend(zip(lay.units, split_budget(total, sizes, [u.weight for u in lay.units])))
            unit_texts.extend([texts[j] if texts is not None else None] * len(lay.units))
        sels = self._select_units(flat, units, unit_texts if texts is not None else None)
        merged = None
        for (u, n_keep), sel in zip(units, sels):
            if sel.indices.numel() != n_keep:
                raise RuntimeError(f"strategy {self.vs.name} kept {sel.indices.numel()} tokens, "
                                   f"budget is {n_keep}")
            if sel.features is not None:
                if merged is None:
                    merged = flat.clone()
                merged[u.rows[sel.indices.to(u.rows.device)]] = sel.features.to(flat.device, flat.dtype)
        it = iter(sels)
        return [self._image_sel(lay, [next(it) for _ in lay.units]) for lay in layouts], merged

    def _select_units(self, flat: torch.Tensor, units: list[tuple[Unit, int]],
                      texts: list[torch.Tensor | None] | None = None) -> list[Selection]:
        """One strategy call per unit, or one batched call per group of same-shaped units."""
        info = self.family.vision_info
        out: list[Selection | None] = [None] * len(units)
        spec, cfg = self.vs, self.vconfig
        if spec.select_batch is not None and texts is None:
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
                tokens = VisualTokens(grid=u.grid, features=flat[u.rows], scores=u.scores, frames=u.frames,
                                      text=texts[i] if texts is not None else None)
                assert spec.select is not None
                out[i] = spec.select(cfg, tokens, n_keep, info)
        return out  # type: ignore[return-value]

    @staticmethod
    def _image_sel(lay: ImageLayout, sels: list[Selection]) -> ImageSel:
        """One image's keep mask over its run, built where the selections are (no copy to the host)."""
        dev = sels[0].indices.device if sels else torch.device("cpu")
        keep = torch.zeros(lay.n_tokens, dtype=torch.bool, device=dev)
        keep[: lay.prefix] = True
        if lay.fixed is not None:
            keep[lay.fixed.to(dev)] = True
        off, groups, kept_before = lay.prefix, [], 0
        merged = any(sel.groups is not None for sel in sels)
        for u, sel in zip(lay.units, sels):
            n = u.rows.numel()
            idx = sel.indices.to(dev)
            if u.span_pos is not None:
                keep[u.span_pos.to(dev)[idx]] = True
            else:
                keep[off + idx] = True
                off += n
            if merged:
                if sel.groups is not None:
                    g = sel.groups.to(dev).clone()
                else:
                    g = torch.full((n,), -1, dtype=torch.long, device=dev)
                    g[idx] = torch.arange(idx.numel(), device=dev)
                groups.append(torch.where(g >= 0, g + kept_before, g))
            kept_before += idx.numel()
        fixed = 0 if lay.fixed is None else int(lay.fixed.numel())
        return ImageSel(keep=keep, groups=torch.cat(groups) if merged else None, fixed=fixed,
                        n_kept=lay.prefix + fixed + kept_before)

    def _select_at_lm(self, state: CallState, embeds: torch.Tensor,
                      valid: torch.Tensor | None = None) -> tuple[list[ImageSel], torch.Tensor]:
        """Families whose placeholder layout is built after the projector (LLaVA-NeXT /
        OneVision: packed crops, unpadding, newline tokens): the family maps the encoder's scores
        onto the placeholder runs; selection runs on the LLM-input embeddings there."""
        t0 = clock()
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
        per_frame = self.vs.unit == "frame"
        layouts: list[ImageLayout] = []
        for m in fam.pixel_keys:
            spans = [sp for sp in state.spans if sp.modality == m]
            if not spans:
                continue
            if m not in raws:
                raise UnsupportedCallError(f"no encoder pass was seen for the {m}s of this call")
            # generate's beam search / num_return_sequences repeats pre-encoded items for each copy
            # of a prompt (the same objects for a list, copies by value for a stacked tensor) while
            # the encoder saw each once: lay out each distinct item once and move it onto its copies
            def lay_out(first: list[int], m: str = m, spans: list[Span] = spans) -> list[ImageLayout]:
                uniq = sorted(set(first))
                lays = dict(zip(uniq, fam.lm_layouts(m, [spans[i] for i in uniq], embeds, raws[m], per_frame)))
                return [lays[i] if i == j else _rebase(lays[i], spans[j], length) for j, i in enumerate(first)]
            items = state.given.get(m)
            if items is None or len(items) != len(spans):
                layouts.extend(lay_out(list(range(len(spans)))))
                continue
            try:      # copies by identity first: equal images of different rows are two encodings
                layouts.extend(lay_out(_first_equal(items)))
            except UnsupportedCallError:     # the counts did not match: copies made by value
                layouts.extend(lay_out(_first_equal(items, by_value=True)))
        texts = None
        if self.vs.text:
            texts = [self._instruction(state, sp, embeds, valid) for sp in state.spans]
        images, merged = self._select_layouts(embeds.reshape(b * length, d), layouts, texts)
        for i, sp in enumerate(state.spans):
            if sp.modality == "image" and self.vs.images == "keep":   # a video method: images pass whole
                images[i] = ImageSel(keep=torch.ones_like(images[i].keep), fixed=images[i].fixed)
        state.seconds += clock() - t0
        return images, (embeds if merged is None else merged.reshape(b, length, d))

    def _encoded(self) -> list[Encoded]:
        """This thread's recent encodings (newest last)."""
        enc = getattr(self._local, "encoded", None)
        if enc is None:
            enc = self._local.encoded = []
        return enc

    def _take_selections(self, state: CallState, embeds: torch.Tensor,
                         valid: torch.Tensor | None = None) -> list[ImageSel]:
        """Selections of the images / videos of this call, in span order (an instruction-
        conditioned strategy selects here, from each encoding's layout and its row's text)."""
        encoded = self._encoded()
        mine = iter([e for e in encoded if e.seq > state.encoded_mark])  # encoded inside this call
        by_modality: dict[str, list[Any]] = {}
        for m in state.from_forward:
            e = next(mine, None)
            if e is None:
                break
            by_modality[m] = e.images if e.deferred is None else [(e, i) for i in range(len(e.outputs))]
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
                sels.append(e.images[i] if e.deferred is None else (e, i))
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
            got = [self._deferred_sel(g[0], g[1], self._instruction(state, sp, embeds, valid))
                   if isinstance(g, tuple) else g for sp, g in zip(spans, got)]
            for sp, im in zip(spans, got):
                if im.keep.numel() != sp.cols.numel():
                    raise UnsupportedCallError(
                        f"an encoded {m} has {im.keep.numel()} tokens but its placeholder run has {sp.cols.numel()}")
            if m == "image" and self.vs.images == "keep":   # a video method: images pass unchanged
                got = [ImageSel(keep=torch.ones_like(im.keep), fixed=im.fixed) for im in got]
            out.extend(got)
        return out

    # -- language model entry: prune inputs (prefill) or follow a record (decode) ---------------
    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        state = self._state.get()
        if state is None:  # language model called directly
            state = CallState()
            self._state.set(state)
        cache = cache_of(kwargs)
        record = self._records.get(cache) if cache is not None else None
        if state.visual is None:
            if record is None:
                return None  # text-only call: pass-through
            state.record = record
            return args, self._decode_inputs(record, kwargs, cache, state.caller_positions)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[:2] != state.visual.shape:
            raise UnsupportedCallError("the language model did not receive inputs_embeds of the prompt's shape")
        state.full_len = state.visual.shape[1]
        if self.vspec is None:
            self.inner_stage.start(state, kwargs, cache)
            return None
        new = self._prune_inputs(state, kwargs)
        if self.lspec is not None:
            self.inner_stage.follow_input_pruning(state)
            self.inner_stage.start(state, new, cache)
        return args, new

    def _lm_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._state.get()
        if state is None:
            return
        if state.pending is not None:
            cache = output_cache(output)
            if cache is not None:
                self._records[cache] = state.pending
            state.pending = None
        if state.stats is not None and state.stats._filled:
            state.stats.prune_ms = state.seconds * 1000.0
            self._local.stats = state.stats
            if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):   # dynamo cannot trace a logger
                st = state.stats.resolve()
                log.debug("%s kept %s of %s visual tokens per row%s in %.2f ms; kept indices %s", st.strategy,
                          st.visual_tokens_kept, st.visual_tokens_in,
                          f" (then {st.inner_tokens_kept} from layer {self.llm_layer})" if st.inner_tokens_kept else "",
                          st.prune_ms, [[k.tolist() for k in row] for row in st.kept_indices])
            state.stats = None

    def _prune_inputs(self, state: CallState, kwargs: dict[str, Any]) -> dict[str, Any]:
        t0 = clock()
        visual = state.visual
        assert visual is not None
        embeds = kwargs["inputs_embeds"]
        b, length = visual.shape
        valid = padding_mask(kwargs.get("attention_mask"), length) if self.vs.text else None
        if self.family.select_at_lm:
            images, embeds = self._select_at_lm(state, embeds, valid)
        else:
            images = self._take_selections(state, embeds, valid)
        keep = ~visual
        for sp, im in zip(state.spans, images):
            keep[sp.row, sp.cols.to(visual.device)] = im.keep.to(visual.device)
        self._fill_stats(state, keep, b, [im.fixed for im in images])
        assert state.stats is not None
        st = state.stats
        groups: list[list[torch.Tensor | None]] = [[] for _ in range(b)]
        for row, im in zip(state.images, images):
            groups[row].append(im.groups)

        def fill_groups() -> None:   # to the host when read (a merging strategy's groups)
            st.merge_groups = [[None if g is None else g.cpu() for g in row] for row in groups]
        st.merge_groups = groups
        st.defer(fill_groups)
        dropped_mask = visual & ~keep
        # the tokens each row drops, from the budgets on the host when every selection knows its
        # count (no host sync), else read from the mask
        if all(im.n_kept is not None for im in images):
            drops = [0] * b
            for sp, im in zip(state.spans, images):
                drops[sp.row] += sp.cols.numel() - int(im.n_kept or 0)
        else:
            drops = dropped_mask.sum(1).tolist()
        width = length - min(drops)
        padded = max(drops) != min(drops)
        self._fill_flops(state, length, width, b)
        if max(drops) == 0:
            state.seconds += clock() - t0
            return kwargs
        idx = left_packed_index(keep, width)
        new = dict(kwargs)
        new["inputs_embeds"] = take(embeds, idx, 1, 0, padded)
        mask = padding_mask(kwargs.get("attention_mask"), length)
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.long, device=embeds.device)
        # a 2D mask, explicit: avoids packed-sequence detection, and lets the model build the masks
        # of a static cache for the pruned slots (the 4D ones generate made count unpruned slots)
        new["attention_mask"] = take(mask, idx, 1, 0, padded)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=embeds.device)[None].expand(b, length)
        compact = self.config.positions == "compact"
        if compact:
            shift = torch.cumsum(dropped_mask.long(), dim=1)
            pos = pos - (shift if pos.dim() == 2 else shift[None])
        new["position_ids"] = take_positions(pos, idx, padded)
        self.family.prune_lm_kwargs(new, kwargs, keep, idx)
        self._slice_labels(idx)
        state.pending = PruneRecord(full_len=length, idx=idx, dropped=dropped_mask.sum(1), compact=compact,
                                    pad2d=mask, padded=padded)
        off = state.pending.offset
        if state.ids is not None and state.ids.shape[1] == length and off > 0:
            state.pending.tail = state.ids[:, -off:]
        state.seconds += clock() - t0
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
        past = seq_len(cache)
        n_new = rec.idx.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 2):
            # a static cache's 4D masks (made by generate for unpruned slots): rebuild the 2D mask
            # from the prefill's padding and the tokens since, and let the model make its own
            n_after = past - n_new + q
            assert rec.pad2d is not None
            mask = torch.cat([rec.pad2d.to(rec.idx.device),
                              torch.ones(b, n_after, dtype=rec.pad2d.dtype, device=rec.idx.device)], 1)
        padded = bool((rec.idx < 0).any()) if rec.padded is None else rec.padded
        if mask is not None:
            new["attention_mask"] = torch.cat([take(mask[:, :rec.full_len], rec.idx, 1, 0, padded),
                                               mask[:, rec.full_len:]], 1)
        elif padded:
            m = torch.ones(b, past + q, dtype=torch.long, device=rec.idx.device)
            m[:, :n_new] = (rec.idx >= 0).long()
            new["attention_mask"] = m
        pos = kwargs.get("position_ids")
        if pos is None:
            offset = 0 if rec.compact else rec.full_len - n_new
            new["position_ids"] = (torch.arange(q, device=rec.idx.device) + past + offset)[None].expand(b, q)
        elif rec.compact == caller_positions:
            assert rec.dropped is not None
            d = rec.dropped.to(pos.device)
            d = d[:, None] if pos.dim() == 2 else d[None, :, None]
            # compact: the caller numbers unpruned, each row renumbered by its own drops; original:
            # the model numbered from the (padded, shared) cache length, which lags by rec.offset
            new["position_ids"] = pos - d if rec.compact else pos + rec.offset
        return new

    # -- statistics -------------------------------------------------------------------------
    def _fill_stats(self, state: CallState, keep: torch.Tensor, b: int, layout: list[int]) -> None:
        """Per-row counts and kept indices of ``keep`` [B, L]; ``layout``: per span, its layout
        (newline) tokens, always kept and not budgeted."""
        st = state.stats
        visual = state.visual
        assert st is not None and visual is not None
        runs = [(sp.row, sp.cols) for sp in state.spans]   # (later stages re-express the spans)

        def fill() -> None:    # when the stats are read, not in the forward (no host sync there)
            st.visual_tokens_in = visual.sum(1).tolist()
            st.visual_tokens_kept = (visual & keep).sum(1).tolist()
            st.kept_indices = [[] for _ in range(b)]
            st.layout_tokens = [0] * b
            for (row, cols), n_layout in zip(runs, layout):
                st.kept_indices[row].append(torch.nonzero(keep[row, cols.to(keep.device)]).flatten().cpu())
                st.layout_tokens[row] += n_layout
        st.defer(fill)

    def _fill_flops(self, state: CallState, length: int, kept_len: int, b: int,
                    segments: list[tuple[int, int]] | None = None) -> None:
        """Analytic prefill FLOPs; ``segments``: (first layer, tokens) of each run of decoder layers
        (default: every layer sees ``kept_len`` tokens)."""
        st = state.stats
        assert st is not None
        vd, v_layers, _ = self.family.vision_dims()
        ld, l_layers = self.family.llm_dims()
        vision = v_layers * sum(layer_flops(n, vd, causal=False) for n in state.vision_segments)
        full = b * l_layers * layer_flops(state.full_len or length, ld, causal=True)
        segs = segments or [(0, kept_len)]
        ends = [start for start, _ in segs[1:]] + [l_layers]
        after = b * sum((end - start) * layer_flops(n, ld, True) for (start, n), end in zip(segs, ends))
        st.flops_before, st.flops_after = vision + full, vision + after
