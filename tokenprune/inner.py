"""The engine's inner-LLM stage (FastV-style strategies, HoliTom's merge "M"): score the visual
tokens at decoder layer K-1 from the hooked q/k of that layer (only the last prompt token's row,
never the eager attention path), then from layer K on keep only the selected tokens — hidden
states (optionally merging the dropped ones into the kept), rotary cos/sin, position ids and the
causal / padding masks, at prefill and at every decode step.

A part of :class:`tokenprune.engine.PruneHandle` (``handle.inner_stage``), composed rather than
mixed in: it reads the handle's ``family``, ``lspec`` / ``lconfig``, ``llm_layer`` and per-call
state, and the handle installs its hooks (:meth:`InnerStage.capture`, :meth:`attn_pre`,
:meth:`attn_post` on layer K-1, :meth:`layer_pre` on layers >= K). Per-call progress is an
:class:`~tokenprune.state.InnerPass`.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .attention import last_row_attention
from .errors import UnsupportedCallError
from .sequence import cache_of, left_packed_index, mask_keys, min_value, seq_len, take, take_positions
from .state import CallState, InnerPass, PruneRecord, Span

if TYPE_CHECKING:
    from .engine import PruneHandle
    from .strategies.base import StrategySpec


def _visual(state: CallState) -> torch.Tensor:
    """[B, L] placeholder mask of a call with visual tokens (the inner stage runs only there)."""
    assert state.visual is not None
    return state.visual


class InnerStage:
    """Hooks of the inner-LLM stage (score at layer K-1, drop or merge from layer K)."""

    def __init__(self, handle: "PruneHandle") -> None:
        self.h = handle

    @property
    def spec(self) -> "StrategySpec[Any]":
        """The inner strategy's spec (the hooks run only when there is one)."""
        assert self.h.lspec is not None
        return self.h.lspec

    @property
    def k(self) -> int:
        """K: the first decoder layer that sees only the kept tokens."""
        assert self.h.llm_layer is not None
        return self.h.llm_layer

    def capture(self, layer: int, which: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """LLM layer K-1's q / k projection outputs (prefill only, before the selection)."""
        state = self.h._state.get()
        if state is None or state.inner is None or state.inner.chosen:
            return
        state.qk.setdefault(layer, {})[which] = output

    def start(self, state: CallState, kwargs: dict[str, Any], cache: Any) -> None:
        mask = kwargs.get("attention_mask")
        b, length = _visual(state).shape
        if mask is not None and mask.dim() != 2:
            raise UnsupportedCallError(f"{self.spec.name} needs a 2D attention_mask (or none)")
        valid = mask.bool() if mask is not None else torch.ones(b, length, dtype=torch.bool,
                                                                device=_visual(state).device)
        last = length - 1 - torch.argmax(torch.flip(valid.long(), dims=[1]), dim=1)
        state.inner = InnerPass(valid=valid.to(_visual(state).device), last=last.to(_visual(state).device),
                                length=length, fixed=self.h.family.structural(state.spans, kwargs["inputs_embeds"]))

    def attn_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state = self.h._state.get()
        if state is not None and state.inner is not None and not state.inner.chosen:
            state.inner.rope = kwargs.get("position_embeddings")

    def attn_post(self, la: Any, module: nn.Module, args: tuple, output: Any) -> None:
        state = self.h._state.get()
        if state is None or state.inner is None or state.inner.chosen:
            return
        t0 = time.perf_counter()
        self.select(state, la)
        state.seconds += time.perf_counter() - t0

    def select(self, state: CallState, la: Any) -> None:
        k = self.k - 1
        qk = state.qk.pop(k)
        b, length = _visual(state).shape
        cont = state.continuation
        if cont is not None and cont.keep is not None and cont.keep.shape[0] == b and cont.keep.shape[1] <= length:
            # an uncached generation step: keep the prefill's selection; every later token is text
            keep = torch.ones(b, length, dtype=torch.bool, device=cont.keep.device)
            keep[:, :cont.keep.shape[1]] = cont.keep
            self.apply_keep(state, keep.to(_visual(state).device), b, length)
            return
        keep = self.choose(state, la, qk, b, length)
        if state.uncached:
            c = getattr(self.h._local, "continuation", None)
            if c is not None and c.keep is None:
                c.keep = keep
        self.apply_keep(state, keep, b, length)

    def choose(self, state: CallState, la: Any, qk: dict[str, torch.Tensor], b: int, length: int) -> torch.Tensor:
        """[B, L] keep mask at the LLM input from the last prompt token's attention at layer K-1."""
        fv = state.inner
        assert fv is not None
        rows = torch.arange(b)
        last = fv.last.cpu()
        q = qk["q"].reshape(b, length, la.num_heads, la.head_dim)[rows, last][:, None]  # [B, 1, H, d]
        kk = qk["k"].reshape(b, length, la.num_kv_heads, la.head_dim).transpose(1, 2)   # [B, Hkv, L, d]
        assert fv.rope is not None, "layer K-1 ran without position_embeddings"
        cos, sin = fv.rope
        fv.rope = None
        cos, sin = cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:])
        q = la.rotary(q.transpose(1, 2), cos[rows, last][:, None], sin[rows, last][:, None])
        kk = la.rotary(kk, cos, sin)
        dev = kk.device
        valid = fv.valid.to(dev) & (torch.arange(length, device=dev)[None] <= fv.last.to(dev)[:, None])
        row = last_row_attention(q, kk, la.scaling, valid)                      # [B, L]
        visual = _visual(state).to(dev)
        keep = ~visual
        p = self.h._prefix
        for sp, fixed in zip(state.spans, fv.fixed):
            span = sp.cols.to(dev)
            if not self.applies(sp):
                keep[sp.row, span] = True
                continue
            cand = torch.ones(span.numel(), dtype=torch.bool, device=dev)
            cand[:p] = False
            cand[fixed.to(dev)] = False             # layout tokens: kept, not in the budget
            content = span[cand]
            n_keep = self.h.lconfig.tokens_for(content.numel() + p) - p   # a kept CLS prefix counts, as before the LLM
            assert self.spec.select_llm is not None
            kept = self.spec.select_llm(self.h.lconfig, row[sp.row, content], n_keep)
            keep[sp.row, span[~cand]] = True
            keep[sp.row, content[kept]] = True
        return keep

    def apply_keep(self, state: CallState, keep: torch.Tensor, b: int, length: int) -> None:
        """Stats, ghost padding, the layer-K gather index and the record for ``keep`` [B, L]."""
        fv = state.inner
        assert fv is not None
        visual = _visual(state).to(keep.device)
        dev = keep.device
        if self.h.vspec is None:
            self.h._fill_stats(state, keep, b, [int(f.numel()) for f in fv.fixed])
        else:  # stacked: stats describe the LLM input; the inner stage adds its own counts
            st = state.stats
            assert st is not None
            st.inner_tokens_kept = (visual & keep).sum(1).tolist()
            st.inner_kept_indices = [[] for _ in range(b)]
            for sp in state.spans:
                st.inner_kept_indices[sp.row].append(torch.nonzero(keep[sp.row, sp.cols.to(dev)]).flatten().cpu())
        fv.keep = keep
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
        fv.idx, fv.ghost = idx, ghost
        self.h._slice_labels(idx, ghost)
        self.h._fill_flops(state, length, idx.shape[1], b, split_layer=self.k)
        if bool((visual & ~keep).any()):
            rec = state.pending or PruneRecord(full_len=length)   # stacked: extend the input record
            rec.inner_len, rec.layer, rec.idx_k, rec.ghost = length, self.k, idx, ghost
            state.pending = rec
            state.record = rec

    def layer_pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        state = self.h._state.get()
        if state is None:
            return None
        rec = state.record
        if rec is None or rec.idx_k is None:
            return None
        t0 = time.perf_counter()
        new = dict(kwargs)
        prefill = state.inner is not None and state.inner.idx is rec.idx_k
        if prefill:
            idx = rec.idx_k
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == rec.inner_len:  # layer K: later layers get the short output of K
                if self.spec.merge_llm is not None:
                    hidden = self.merge(state, hidden)
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

    def merge(self, state: CallState, hidden: torch.Tensor) -> torch.Tensor:
        """Merge each image's dropped tokens into its kept ones (HoliTom "M") before slicing at K."""
        assert state.inner is not None and state.inner.keep is not None
        keep = state.inner.keep.to(hidden.device)
        out = hidden.clone()
        for sp, fixed in zip(state.spans, state.inner.fixed):
            if not self.applies(sp):
                continue
            cand = torch.ones(sp.cols.numel(), dtype=torch.bool)
            cand[: self.h._prefix] = False
            cand[fixed] = False
            r, grid = sp.row, sp.cols[cand].to(hidden.device)
            kept = torch.nonzero(keep[r, grid]).flatten()
            out[r, grid[kept]] = self.spec.merge_llm(self.h.lconfig, hidden[r, grid], kept)  # type: ignore[misc]
        return out

    def applies(self, sp: Span) -> bool:
        return self.h.inner_modalities is None or sp.modality in self.h.inner_modalities

    def follow_input_pruning(self, state: CallState) -> None:
        """After input pruning, express the placeholder mask and the spans in the pruned sequence
        (what the inner stage sees), keeping only the kept tokens of each span."""
        rec = state.pending
        if rec is None or rec.idx is None:
            return
        idx = rec.idx
        b, n = idx.shape
        inv = torch.full((b, _visual(state).shape[1]), -1, dtype=torch.long, device=idx.device)
        rows = torch.arange(b, device=idx.device)[:, None].expand(b, n)
        valid = idx >= 0
        inv[rows[valid], idx[valid]] = torch.arange(n, device=idx.device)[None].expand(b, n)[valid]
        for sp in state.spans:
            new = inv[sp.row, sp.cols.to(idx.device)]
            sp.cols = new[new >= 0]
        state.visual = take(_visual(state), idx, 1, False)

    def _memo(self, state: CallState, t: torch.Tensor, fn) -> torch.Tensor:
        hit = state.memo.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        out = fn(t)
        state.memo[id(t)] = (t, out)
        return out

    def _inner_mask_prefill(self, state: CallState, rec: PruneRecord, mask: Any) -> Any:
        idx, ghost = rec.idx_k, rec.ghost
        assert idx is not None
        if mask is None:
            if ghost is None:
                return None  # causal, no padding: the kernel's own causal path stays valid

            def causal(i: torch.Tensor) -> torch.Tensor:
                n = i.shape[1]
                m = torch.tril(torch.ones(n, n, dtype=torch.bool, device=i.device))
                return mask_keys(m[None, None].expand(i.shape[0], 1, n, n), ghost, n)
            return self._memo(state, idx, causal)

        def build(m: torch.Tensor) -> torch.Tensor:
            if m.dim() == 2:
                out = take(m, idx, 1, 0)
            else:
                fill = min_value(m)
                out = take(take(m, idx, 2, fill), idx, 3, fill)
            return mask_keys(out, ghost, idx.shape[1]) if ghost is not None else out
        return self._memo(state, mask, build)

    def _inner_mask_decode(self, state: CallState, rec: PruneRecord, kwargs: dict[str, Any], q: int) -> Any:
        mask = kwargs.get("attention_mask")
        idx, ghost, full = rec.idx_k, rec.ghost, rec.inner_len
        assert idx is not None and rec.layer is not None
        if mask is None:
            if ghost is None:
                return None
            kv = seq_len(cache_of(kwargs), rec.layer) + q
            m = torch.ones(idx.shape[0], 1, q, kv, dtype=torch.bool, device=idx.device)
            return mask_keys(m, ghost, idx.shape[1])

        def build(m: torch.Tensor) -> torch.Tensor:
            fill = 0 if m.dim() == 2 else min_value(m)
            out = torch.cat([take(m[..., :full], idx, m.dim() - 1, fill), m[..., full:]], dim=-1)
            return mask_keys(out, ghost, idx.shape[1]) if ghost is not None else out
        return self._memo(state, mask, build)
