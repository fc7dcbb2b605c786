"""The engine's inner-LLM stages (FastV-style strategies, PyramidDrop's several stages, DART's
duplication rule, HoliTom's merge "M"). At each stage s with layer K_s: the signals the strategy
names (``StrategySpec.llm_signals``) are read from layer K_s-1 — attention rows computed from its
hooked q/k (only the rows asked for, never the eager attention path), its keys — and from the hidden
states entering layer K_s; the strategy chooses among each image's surviving tokens; from layer K_s
on the sequence holds only the kept ones — hidden states (optionally merging the dropped ones into
the kept), rotary cos/sin, position ids and the causal / padding masks, at prefill and at every
decode step. Each stage re-selects among the previous stage's survivors.

A part of :class:`tokenprune.engine.PruneHandle` (``handle.inner_stage``), composed rather than
mixed in: it reads the handle's ``family``, ``lspec`` / ``lconfig``, ``llm_layers`` and per-call
state, and the handle installs its hooks (:meth:`InnerStage.capture` and :meth:`attn_pre` on every
layer K_s-1, :meth:`layer_pre` on the layers >= K_0). Per-call progress is an
:class:`~tokenprune.state.InnerPass`; what later decode steps need is the record's
:class:`~tokenprune.state.InnerCut` list.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .attention import last_row_attention, rows_attention
from .errors import UnsupportedCallError
from .sequence import cache_of, left_packed_index, mask_keys, min_value, seq_len, take, take_positions
from .state import CallState, InnerCut, InnerPass, PruneRecord, Span, clock
from .stats import StageStats
from .strategies.base import LLMTokens, Selection

if TYPE_CHECKING:
    from .engine import PruneHandle
    from .strategies.base import StrategySpec

#: the signals that need layer K-1's q / k projections
QK_SIGNALS = frozenset({"attention", "text_attention", "keys"})
Q_SIGNALS = frozenset({"attention", "text_attention"})


def _visual(state: CallState) -> torch.Tensor:
    """[B, L] placeholder mask of a call with visual tokens (the inner stage runs only there)."""
    assert state.visual is not None
    return state.visual


class InnerStage:
    """Hooks of the inner-LLM stages (signals at layer K_s-1, drop or merge from layer K_s)."""

    def __init__(self, handle: "PruneHandle") -> None:
        self.h = handle

    @property
    def spec(self) -> "StrategySpec[Any]":
        """The inner strategy's spec (the hooks run only when there is one)."""
        assert self.h.lspec is not None
        return self.h.lspec

    @property
    def layers(self) -> list[int]:
        """K_0 < K_1 < ...: the first decoder layer of each stage."""
        return self.h.llm_layers

    @property
    def uses_qk(self) -> bool:
        return bool(self.spec.llm_signals & QK_SIGNALS)

    # -- hooks on the scoring layers K_s - 1 ----------------------------------------------------
    def _scoring(self, state: CallState | None, layer: int) -> bool:
        """Whether a stage still to choose scores on ``layer`` (a hybrid LLM's later stage may score
        on the same full-attention layer as an earlier one, which ran before that stage's cut)."""
        return (state is not None and state.inner is not None and not state.inner.chosen
                and layer in self.h.score_layers[state.inner.stage:])

    def capture(self, layer: int, which: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """LLM layer K_s-1's q / k projection outputs (prefill only, before stage s chooses)."""
        state = self.h._state.get()
        if self._scoring(state, layer):
            assert state is not None
            state.qk.setdefault(layer, {})[which] = output

    def attn_pre(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state = self.h._state.get()
        if self._scoring(state, layer):
            assert state is not None and state.inner is not None
            state.inner.rope = kwargs.get("position_embeddings")

    def start(self, state: CallState, kwargs: dict[str, Any], cache: Any) -> None:
        mask = kwargs.get("attention_mask")
        b, length = _visual(state).shape
        if mask is not None and mask.dim() != 2:
            raise UnsupportedCallError(f"{self.spec.name} needs a 2D attention_mask (or none)")
        fixed = self.h.family.structural(state.spans, kwargs["inputs_embeds"])
        if b > 1 and not self.h.family.inner_ghosts and self._uneven(state, fixed, b):
            raise UnsupportedCallError(
                f"{self.spec.name} drops tokens inside the LLM, and family {self.h.family.name!r} has "
                "linear-attention layers that cannot mask the padding rows that keep different numbers "
                "of tokens would need; call it with one row at a time (or with rows that drop equally "
                "many, as beam search's copies)")
        dev = _visual(state).device
        valid = mask.bool() if mask is not None else torch.ones(b, length, dtype=torch.bool, device=dev)
        last = length - 1 - torch.argmax(torch.flip(valid.long(), dims=[1]), dim=1)
        state.inner = InnerPass(valid=valid.to(dev), last=last.to(dev), length=length, fixed=fixed,
                                n_stages=len(self.layers), keep=torch.ones(b, length, dtype=torch.bool, device=dev),
                                embeds=kwargs["inputs_embeds"] if "embeds" in self.spec.llm_signals else None)

    # -- choosing one stage ---------------------------------------------------------------------
    def select(self, state: CallState, hidden: torch.Tensor) -> None:
        """Stage s at layer K_s: choose each image's survivors and cut the sequence."""
        fv = state.inner
        assert fv is not None and fv.keep is not None
        s = fv.stage
        b, length = _visual(state).shape
        dev = fv.keep.device
        prev = fv.cuts[-1] if fv.cuts else None
        cur = prev.idx.to(dev) if prev is not None else torch.arange(length, device=dev)[None].expand(b, length)
        inv = torch.full((b, length), -1, dtype=torch.long, device=dev)
        inv.scatter_(1, cur, torch.arange(cur.shape[1], device=dev)[None].expand_as(cur).contiguous())
        cont = state.continuation
        if cont is not None and len(cont.keeps) > s and cont.keeps[s].shape[0] == b \
                and cont.keeps[s].shape[1] <= length:
            # an uncached generation step: keep the prefill's selection (and merged states: the
            # prefix is the same, so they are too); every later token is text
            keep = torch.ones(b, length, dtype=torch.bool, device=dev)
            keep[:, :cont.keeps[s].shape[1]] = cont.keeps[s].to(dev)
            merges = cont.merges[s]
        else:
            keep, merges = self.choose(state, s, hidden, cur, inv, prev)
            if state.uncached:
                c = getattr(self.h._local, "continuation", None)
                if c is not None and len(c.keeps) == s:
                    c.keeps.append(keep)
                    c.merges.append(merges)
        self.cut(state, s, keep, cur, inv, merges)
        fv.stage += 1

    def _content(self, sp: Span, fixed: torch.Tensor) -> torch.Tensor:
        """A run's candidate columns: not a kept CLS prefix, not a layout token."""
        cand = torch.ones(sp.cols.numel(), dtype=torch.bool)
        cand[: self.h._prefix] = False
        cand[fixed.cpu()] = False
        return sp.cols[cand]

    def _n_keep(self, s: int, n_in: int, alive: int) -> int:
        """Tokens stage s keeps of a run of ``n_in`` candidates of which ``alive`` survive (the spec's
        budgets)."""
        first = self.h.lconfig.tokens_for(n_in + self.h._prefix) - self.h._prefix  # a kept CLS prefix counts
        n_keep = first if self.spec.llm_budget is None else self.spec.llm_budget(self.h.lconfig, s, first, n_in)
        return max(0, min(n_keep, alive))

    def _uneven(self, state: CallState, fixed: list[torch.Tensor], b: int) -> bool:
        """Whether some stage would drop different numbers of tokens from different rows (rows
        would then need ghost padding), from the budgets alone, before any layer runs."""
        alive: dict[int, int] = {}
        n_in: dict[int, int] = {}
        for j, (sp, fx) in enumerate(zip(state.spans, fixed)):
            if self.applies(sp):
                n_in[j] = alive[j] = int(self._content(sp, fx).numel())
        for s in range(len(self.layers)):
            dropped = [0] * b
            for j in n_in:
                k = self._n_keep(s, n_in[j], alive[j])
                dropped[state.spans[j].row] += alive[j] - k
                alive[j] = k
            if len(set(dropped)) > 1:
                return True
        return False

    def choose(self, state: CallState, s: int, hidden: torch.Tensor, cur: torch.Tensor, inv: torch.Tensor,
               prev: InnerCut | None) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """[B, L] keep mask of stage s (a subset of the previous one) from the strategy's signals,
        and the merges: (row, positions in the current sequence, new hidden states) of kept tokens
        that carry merged ones."""
        fv = state.inner
        assert fv is not None and fv.keep is not None
        sig = self.spec.llm_signals
        b, length = _visual(state).shape
        n_cur = cur.shape[1]
        dev = hidden.device
        cur, inv = cur.to(dev), inv.to(dev)
        valid = fv.valid.to(dev).gather(1, cur)
        if prev is not None and prev.ghost is not None:
            valid = valid & ~prev.ghost.to(dev)
        last = inv.gather(1, fv.last.to(dev)[:, None])[:, 0]            # [B] in the current sequence
        seen = valid & (torch.arange(n_cur, device=dev)[None] <= last[:, None])
        q = kk = cos = sin = None
        if sig & QK_SIGNALS:
            layer = self.h.score_layers[s]
            la = self.h.family.llm_attention(layer)
            again = layer in self.h.score_layers[s + 1:]     # a later stage reads this layer too
            qk = state.qk[layer] if again else state.qk.pop(layer)
            assert fv.rope is not None, f"layer {layer} ran without position_embeddings"
            cos, sin = fv.rope
            if not again:
                fv.rope = None
            cos, sin = cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:])
            ran_on = next((c.idx for c in reversed(fv.cuts) if c.layer <= layer), None)
            if prev is not None and ran_on is not prev.idx:
                # the layer ran before an earlier stage's cut: its rows of the tokens still here
                qk, cos, sin = self._rows_now(qk, cos, sin, ran_on, cur, length)
            kk = la.rotary(qk["k"].reshape(b, n_cur, la.num_kv_heads, la.head_dim).transpose(1, 2), cos, sin)
            if sig & Q_SIGNALS:
                q = qk["q"].reshape(b, n_cur, la.num_heads, la.head_dim)
        row = None
        if "attention" in sig:
            assert q is not None and kk is not None and cos is not None and sin is not None
            rows = torch.arange(b, device=dev)
            q_last = la.rotary(q[rows, last][:, None].transpose(1, 2), cos[rows, last][:, None],
                               sin[rows, last][:, None])
            row = last_row_attention(q_last, kk, la.scaling, seen)                       # [B, Lc]
        keys = kk.transpose(1, 2).reshape(b, n_cur, -1) if "keys" in sig and kk is not None else None
        visual = _visual(state).to(dev)
        keep = fv.keep.to(dev).clone()
        merges: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        positions = torch.arange(length, device=dev)
        norm = self.h.family.llm_final_norm() if "hidden" in sig else None
        for j, (sp, fixed) in enumerate(zip(state.spans, fv.fixed)):
            content = self._content(sp, fixed).to(dev)
            if s == 0:
                fv.n_in.append(int(content.numel()))
            if not self.applies(sp):
                continue
            r = sp.row
            alive = content[keep[r, content]]
            pos = inv[r, alive]
            tokens = LLMTokens(stage=s, n_in=fv.n_in[j])
            text_full = torch.nonzero((positions > sp.cols.max().to(dev)) & (positions <= fv.last[r].to(dev))
                                      & fv.valid[r].to(dev) & ~visual[r]).flatten()
            text = inv[r, text_full]
            if row is not None:
                tokens.attention = row[r, pos]
            if "text_attention" in sig:
                assert q is not None and kk is not None and cos is not None and sin is not None
                qt = la.rotary(q[r, text][None].transpose(1, 2), cos[r, text][None], sin[r, text][None])[0]
                ok = seen[r][None] & (torch.arange(n_cur, device=dev)[None] <= text[:, None])
                tokens.text_attention = rows_attention(qt, kk[r], la.scaling, ok)[:, pos]     # [T, N]
            if keys is not None:
                tokens.keys, tokens.text_keys = keys[r, pos], keys[r, text]
            if "hidden" in sig:
                tokens.hidden, tokens.text_hidden, tokens.final_norm = hidden[r, pos], hidden[r, text], norm
            if "embeds" in sig:
                assert fv.embeds is not None
                e = fv.embeds.to(dev)
                tokens.embeds, tokens.text_embeds = e[r, content], e[r, text_full]
                tokens.alive = torch.nonzero(keep[r, content]).flatten()
            n_keep = self._n_keep(s, fv.n_in[j], int(alive.numel()))
            assert self.spec.select_llm is not None
            got = self.spec.select_llm(self.h.lconfig, tokens, n_keep)
            feats: torch.Tensor | None = None
            if isinstance(got, Selection):      # a merging rule: the kept tokens' new hidden states
                kept, feats = got.indices.to(dev), got.features
            else:
                kept = got.to(dev)
            if kept.numel() != n_keep or torch.unique(kept).numel() != n_keep:
                raise RuntimeError(f"{self.spec.name} returned {kept.numel()} indices (unique: "
                                   f"{torch.unique(kept).numel()}) for a budget of {n_keep}")
            if feats is None and self.spec.merge_llm is not None:
                feats = self.spec.merge_llm(self.h.lconfig, hidden[r, pos], kept)
            if feats is not None:
                merges.append((r, pos[kept], feats))
            drop = torch.ones(alive.numel(), dtype=torch.bool, device=dev)
            drop[kept] = False
            keep[r, alive[drop]] = False
        return keep, merges

    @staticmethod
    def _rows_now(qk: dict[str, torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, ran_on: torch.Tensor | None,
                  cur: torch.Tensor, length: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """q / k / cos / sin of a layer that ran on the sequence ``ran_on`` [B, L_r] (LLM-input
        positions; None: the LLM input itself), gathered to the current sequence ``cur`` [B, L_c]."""
        rows = cur
        if ran_on is not None:     # where each LLM-input position sits in ``ran_on`` (its padding: a spare column)
            b, n = ran_on.shape
            r = ran_on.to(cur.device)
            where = torch.full((b, length + 1), -1, dtype=torch.long, device=cur.device)
            where.scatter_(1, torch.where(r >= 0, r, length), torch.arange(n, device=cur.device).expand(b, n))
            rows = where.gather(1, cur.clamp(min=0)).masked_fill(cur < 0, -1)
        return ({key: take(v, rows, 1, 0, padded=True) for key, v in qk.items()},
                take(cos, rows, 1, 0, padded=True), take(sin, rows, 1, 0, padded=True))

    def cut(self, state: CallState, s: int, keep: torch.Tensor, cur: torch.Tensor, inv: torch.Tensor,
            merges: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Stats of stage s; if it dropped anything: ghost padding, its :class:`InnerCut` and the record."""
        fv = state.inner
        assert fv is not None
        dev = keep.device
        cur, inv = cur.to(dev), inv.to(dev)
        b, length = keep.shape
        visual = _visual(state).to(dev)
        st = state.stats
        assert st is not None
        kept_idx: list[list[torch.Tensor]] = [[] for _ in range(b)]
        for sp in state.spans:
            kept_idx[sp.row].append(torch.nonzero(keep[sp.row, sp.cols.to(dev)]).flatten().cpu())
        st.stages.append(StageStats(layer=self.layers[s], tokens_kept=(visual & keep).sum(1).tolist(),
                                    kept_indices=kept_idx, merged=bool(merges),
                                    score_layer=self.h.score_layers[s]))
        if s == 0:
            if self.h.vspec is None:
                self.h._fill_stats(state, keep, b, [int(f.numel()) for f in fv.fixed])
            else:  # stacked: stats describe the LLM input; the inner stage adds its own counts
                st.inner_tokens_kept = st.stages[0].tokens_kept
                st.inner_kept_indices = kept_idx
        fv.keep = keep
        present = torch.zeros(b, length, dtype=torch.bool, device=dev)
        present.scatter_(1, cur, True)
        dropped = present & ~keep
        if bool(dropped.any()):
            # rows must keep equal lengths: pad short rows with "ghost" tokens (dropped tokens that
            # stay in the sequence but are hidden as keys from every query)
            count = dropped.sum(1)
            extra = count - count.min()
            ghost_full = torch.zeros_like(keep)
            for r in range(b):
                if int(extra[r]):
                    assert self.h.family.inner_ghosts, "start() refuses batches that would need ghosts here"
                    ghost_full[r, torch.nonzero(dropped[r]).flatten()[: int(extra[r])]] = True
            idx = left_packed_index(keep | ghost_full)
            ghost = torch.gather(ghost_full, 1, idx) if bool(ghost_full.any()) else None
            local = inv.gather(1, idx)
            fv.cuts.append(InnerCut(layer=self.layers[s], idx=idx, ghost=ghost, local=local, merges=merges))
            self.h._slice_labels(local, ghost)
            rec = state.pending or PruneRecord(full_len=length)   # stacked: extend the input record
            rec.inner_len, rec.cuts = length, fv.cuts
            state.pending = rec
            state.record = rec
        segments = [(0, length)] + [(c.layer, c.idx.shape[1]) for c in fv.cuts]
        self.h._fill_flops(state, length, length, b, segments=segments)

    # -- the layers >= K_0 ----------------------------------------------------------------------
    def layer_pre(self, layer: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        state = self.h._state.get()
        if state is None:
            return None
        fv = state.inner
        if fv is not None and not fv.chosen and layer == self.layers[fv.stage]:
            t0 = clock()
            self.select(state, args[0] if args else kwargs["hidden_states"])
            state.seconds += clock() - t0
        rec = state.record
        if rec is None or not rec.cuts:
            return None
        i = max((j for j, c in enumerate(rec.cuts) if c.layer <= layer), default=-1)
        if i < 0:
            return None
        cut = rec.cuts[i]
        t0 = clock()
        new = dict(kwargs)
        if fv is not None and rec.cuts is fv.cuts:       # this call's prefill
            if i >= fv.applied:           # the first layer of the cut: later layers get its output
                hidden = args[0] if args else kwargs["hidden_states"]
                if cut.merges:
                    hidden = hidden.clone()
                    for r, pos, feats in cut.merges:
                        hidden[r, pos.to(hidden.device)] = feats.to(hidden.dtype)
                hidden = take(hidden, cut.local, 1, 0)
                fv.applied = i + 1
                if args:
                    args = (hidden,) + tuple(args[1:])
                else:
                    new["hidden_states"] = hidden
            idx = cut.idx
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                new["position_embeddings"] = tuple(self._memo(state, t, i, lambda x: take(x, idx, 1, 0)) for t in pe)
            if kwargs.get("position_ids") is not None:
                new["position_ids"] = self._memo(state, kwargs["position_ids"], i, lambda p: take_positions(p, idx))
            new["attention_mask"] = self._inner_mask_prefill(state, cut, i, kwargs.get("attention_mask"))
        else:
            hidden = args[0] if args else kwargs["hidden_states"]
            new["attention_mask"] = self._inner_mask_decode(state, rec, cut, i, kwargs, hidden.shape[1])
        state.seconds += clock() - t0
        return args, new

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

    def _memo(self, state: CallState, t: torch.Tensor, tag: int, fn) -> torch.Tensor:
        """``fn(t)`` once per call and cut (every layer of a cut gets the same object)."""
        hit = state.memo.get((id(t), tag))
        if hit is not None and hit[0] is t:
            return hit[1]
        out = fn(t)
        state.memo[(id(t), tag)] = (t, out)
        return out

    def _inner_mask_prefill(self, state: CallState, cut: InnerCut, i: int, mask: Any) -> Any:
        idx, ghost = cut.idx, cut.ghost
        if mask is None:
            if ghost is None:
                return None  # causal, no padding: the kernel's own causal path stays valid

            def causal(x: torch.Tensor) -> torch.Tensor:
                n = x.shape[1]
                m = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
                return mask_keys(m[None, None].expand(x.shape[0], 1, n, n), ghost, n)
            return self._memo(state, idx, i, causal)

        def build(m: torch.Tensor) -> torch.Tensor:
            if m.dim() == 2:
                out = take(m, idx, 1, 0)
            else:
                fill = min_value(m)
                out = take(take(m, idx, 2, fill), idx, 3, fill)
            return mask_keys(out, ghost, idx.shape[1]) if ghost is not None else out
        return self._memo(state, mask, i, build)

    def _inner_mask_decode(self, state: CallState, rec: PruneRecord, cut: InnerCut, i: int,
                           kwargs: dict[str, Any], q: int) -> Any:
        mask = kwargs.get("attention_mask")
        idx, ghost, full = cut.idx, cut.ghost, rec.inner_len
        if mask is None:
            if ghost is None:
                return None
            kv = seq_len(cache_of(kwargs), cut.layer) + q
            m = torch.ones(idx.shape[0], 1, q, kv, dtype=torch.bool, device=idx.device)
            return mask_keys(m, ghost, idx.shape[1])

        def build(m: torch.Tensor) -> torch.Tensor:
            fill = 0 if m.dim() == 2 else min_value(m)
            out = torch.cat([take(m[..., :full], idx, m.dim() - 1, fill), m[..., full:]], dim=-1)
            return mask_keys(out, ghost, idx.shape[1]) if ghost is not None else out
        return self._memo(state, mask, i, build)
