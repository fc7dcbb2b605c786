"""The engine's inner-LLM stage (FastV-style strategies, HoliTom's merge "M"): score the visual
tokens at decoder layer K-1 from the hooked q/k of that layer (only the last prompt token's row,
never the eager attention path), then from layer K on keep only the selected tokens — hidden
states (optionally merging the dropped ones into the kept), rotary cos/sin, position ids and the
causal / padding masks, at prefill and at every decode step.

A mixin of :class:`tokenprune.engine.PruneHandle`: it reads the handle's ``family``, ``lspec`` /
``lconfig``, ``llm_layer`` and per-call state, and is installed by the handle's ``install``.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .attention import last_row_attention
from .errors import UnsupportedCallError
from .sequence import cache_of, left_packed_index, mask_keys, min_value, seq_len, take, take_positions
from .state import CallState, PruneRecord, Span


class InnerLLMStage:
    """Hooks of the inner-LLM stage (score at layer K-1, drop or merge from layer K)."""

    def _start_inner(self, state: CallState, kwargs: dict[str, Any], cache: Any):
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

    def _llm_attn_post(self, la: Any, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._state.get()
        if state is None or state.fastv is None or "idx" in state.fastv:
            return
        t0 = time.perf_counter()
        self._select_inner(state, la)
        state.seconds += time.perf_counter() - t0

    def _select_inner(self, state: CallState, la: Any) -> None:
        k = self.llm_layer - 1
        qk = state.qk.pop(k)
        b, length = state.visual.shape
        cont = state.continuation
        if cont is not None and cont.keep is not None and cont.keep.shape[0] == b and cont.keep.shape[1] <= length:
            # an uncached generation step: keep the prefill's selection; every later token is text
            keep = torch.ones(b, length, dtype=torch.bool, device=cont.keep.device)
            keep[:, :cont.keep.shape[1]] = cont.keep
            self._apply_inner_keep(state, keep.to(state.visual.device), b, length)
            return
        keep = self._choose_inner(state, la, qk, b, length)
        if state.uncached:
            c = getattr(self._local, "continuation", None)
            if c is not None and c.keep is None:
                c.keep = keep
        self._apply_inner_keep(state, keep, b, length)

    def _choose_inner(self, state: CallState, la: Any, qk: dict[str, torch.Tensor], b: int, length: int) -> torch.Tensor:
        """[B, L] keep mask at the LLM input from the last prompt token's attention at layer K-1."""
        fv = state.fastv
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
        return keep

    def _apply_inner_keep(self, state: CallState, keep: torch.Tensor, b: int, length: int) -> None:
        """Stats, ghost padding, the layer-K gather index and the record for ``keep`` [B, L]."""
        fv = state.fastv
        visual = state.visual.to(keep.device)
        dev = keep.device
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
        self._slice_labels(idx, ghost)
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
