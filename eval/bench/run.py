"""The measurement loop of ``tokenprune bench``.

For each model preset x batch x budget x strategy, side by side in one run:

* ``ttft`` — time to first token: one forward over the prompt returning the last logits
  (vision + selection + LLM prefill), for the unpruned model, the pruned model and the
  **ideal** (the unpatched model fed only the kept visual tokens: vision + LLM on the kept
  sequence, no scoring);
* ``llm`` — the language model's own part of that forward (timed by hooks on it);
* ``vision`` / ``vision_pruned`` — ``get_image_features`` unpatched / patched (capture + select);
* ``prune`` — the hooks' own wall clock (``last_stats.prune_ms``);
* decode tokens/s of a greedy ``generate`` (smallest budget only), timed between its first and
  last token inside each call; peak memory of the prefill (``timing.peak_method``); KV-cache size;
  analytic FLOPs ratio.

Each timing is the median of the preset's repeats, with its min-max; every row is checked against
``sanity`` (flagged in the JSON, the markdown and on stderr when a rule breaks).

Vision table: SDPA tower vs our capture vs the official-style eager + ``output_attentions``, and
how many of the official-style kept tokens we keep too.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

import tokenprune
from tokenprune._extras import MissingExtraError, require_all
from tokenprune._extras import default_out as extras_default_out
from tokenprune.api import family_for
from tokenprune.sequence import output_cache

from .presets import PRESETS, BenchPreset, ModelPreset, build
from .reference import eager_copy, official_select
from .sanity import check_row, check_vision_row, noisy
from .timing import (
    OtherWork,
    TokenClock,
    cache_mb,
    decode_samples,
    gpu_other_processes,
    interleaved,
    median_range,
    paired_stats,
    peak_mb,
    peak_method,
    time_ms,
    time_samples,
)


class _LMTimer:
    """Times every call of a module with hooks registered last (so it sees the pruned input)."""

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.spans: list[Any] = []
        self._h = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _now(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _pre(self, *a: Any) -> None:
        self._start = self._now()

    def _post(self, *a: Any) -> None:
        self.spans.append((self._start, self._now()))

    def median_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            ms = [s.elapsed_time(e) for s, e in self.spans]
        else:
            ms = [(e - s) * 1000 for s, e in self.spans]
        return statistics.median(ms) if ms else float("nan")

    def close(self) -> None:
        for h in self._h:
            h.remove()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def placeholder_id(mp: ModelPreset, family: Any) -> int:
    """The placeholder token the preset's visual input expands to (video or image)."""
    return int(family.video_token_id) if mp.video_frames else int(family.image_token_id)


def _inputs(mp: ModelPreset, model: Any, family: Any, batch: int, device: str) -> dict[str, torch.Tensor]:
    """The family's own synthetic inputs for the preset, on ``device`` (floating tensors in its dtype)."""
    inp = family.bench_inputs(batch, mp.text_tokens, size=mp.size, video_frames=mp.video_frames)
    return {k: (v.to(device, mp.dtype) if v.is_floating_point() else v.to(device)) for k, v in inp.items()}


def _features(out: Any) -> torch.Tensor:
    """``get_image_features`` output -> [n_img * N, D] (pooler_output is a tensor or a list)."""
    f = out.pooler_output
    f = torch.cat(list(f)) if isinstance(f, (list, tuple)) else f
    return f.reshape(-1, f.shape[-1])


def _kept_mask(ids: torch.Tensor, token_id: int, kept: list[list[torch.Tensor]]) -> torch.Tensor:
    """[B, L] True for text and kept visual tokens (one image or video per row)."""
    keep = ids != token_id
    for b in range(ids.shape[0]):
        pos = torch.nonzero(~keep[b]).flatten()
        keep[b, pos[kept[b][0].to(pos.device)]] = True
    return keep


def _checked(row: dict[str, Any], broken: list[str], spread: list[str]) -> dict[str, Any]:
    """``row`` with its broken sanity rules and noisy timings attached; a warning for each broken rule."""
    row["sanity"], row["noisy"] = broken, spread
    where = f"{row['model']} bs={row['batch']} {row['strategy']} kept={row['kept']}"
    for msg in broken:
        print(f"bench: warning: {where} fails a sanity check: {msg}", file=sys.stderr)
    return row


def _vision_call(core: Any, inputs: dict[str, torch.Tensor]) -> Any:
    """The model's own vision entry point for these inputs (video or image features)."""
    if "pixel_values_videos" in inputs and "pixel_values" not in inputs:
        return core.get_video_features(inputs["pixel_values_videos"])   # kwarg renamed in 5.2x
    return core.get_image_features(**{k: inputs[k] for k in ("pixel_values", "image_grid_thw", "image_sizes")
                                      if k in inputs})


class Patched:
    """``fn`` run with ``strategy`` applied: :func:`~eval.bench.timing.interleaved` calls ``enter`` /
    ``leave`` around the timed call, so installing and removing the hooks is not timed."""

    def __init__(self, model: Any, strategy: str, params: dict[str, Any], fn: Callable[[], Any]) -> None:
        self.model, self.strategy, self.params, self.fn = model, strategy, params, fn
        self.handle: Any = None

    def enter(self) -> None:
        self.handle = tokenprune.apply(self.model, self.strategy, **self.params)

    def leave(self) -> None:
        self.handle.remove()

    def __call__(self) -> Any:
        return self.fn()


class _SlicedIdeal:
    """The unpatched model with a pre-hook on its language model that keeps only ``keep`` [B, L] by
    plain indexing (Qwen: M-RoPE positions and DeepStack sliced alike); hooked between ``enter`` and
    ``leave`` only."""

    def __init__(self, model: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        self.model, self.inputs, self.keep = model, inputs, keep
        b = keep.shape[0]
        self.idx = torch.nonzero(keep)[:, 1].reshape(b, -1)
        self.hook: Any = None

    def _pre(self, mod: Any, args: tuple, kw: dict[str, Any]) -> tuple:
        idx, keep = self.idx, self.keep
        new = dict(kw)
        new["inputs_embeds"] = torch.gather(kw["inputs_embeds"], 1, idx[..., None].expand(-1, -1, kw["inputs_embeds"].shape[-1]))
        pos = kw.get("position_ids")
        if pos is not None:
            new["position_ids"] = torch.gather(pos, -1, idx.expand(*pos.shape[:-2], -1, -1))
        if kw.get("attention_mask") is not None:
            new["attention_mask"] = torch.gather(kw["attention_mask"], 1, idx)
        vpm = kw.get("visual_pos_masks")
        if vpm is not None:
            rows = keep[vpm]
            new["visual_pos_masks"] = torch.gather(vpm, 1, idx)
            new["deepstack_visual_embeds"] = [e[rows] for e in kw["deepstack_visual_embeds"]]
        return args, new

    def enter(self) -> None:
        self.hook = self.model.model.language_model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def leave(self) -> None:
        self.hook.remove()

    def __call__(self, use_cache: bool = False) -> Any:
        return self.model(**self.inputs, logits_to_keep=1, use_cache=use_cache)


def _hand_ideal(model: Any, family: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> Callable[[], Any]:
    """The ideal forward of LLaVA images built by hand: tower, projector, the embeddings with the
    features written in, then only the kept rows (``keep`` [B, L]) through the LLM, compact positions."""
    core, ids = model.model, inputs["input_ids"]
    b = ids.shape[0]
    mask_kept = torch.ones(b, int(keep[0].sum()), dtype=torch.long, device=ids.device)

    def forward() -> Any:
        feats = _features(core.get_image_features(pixel_values=inputs["pixel_values"]))
        emb = core.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == family.image_token_id)[..., None], feats.to(emb.dtype))
        hidden = core.language_model(inputs_embeds=emb[keep].reshape(b, -1, emb.shape[-1]),
                                     attention_mask=mask_kept, use_cache=False).last_hidden_state
        return model.lm_head(hidden[:, -1:])
    return forward


class Bench:
    def __init__(self, bp: BenchPreset, device: str, strategies: list[str] | None = None) -> None:
        self.bp, self.device = bp, device
        self.strategies = list(strategies or bp.strategies)
        self.rows: list[dict[str, Any]] = []
        self.vision_rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []

    def strategies_for(self, mp: ModelPreset) -> list[str]:
        """The bench's strategies, or the preset's own list (video), minus any the user left out."""
        if mp.strategies is None:
            return self.strategies
        return [s for s in mp.strategies if s in self.strategies or s not in self.bp.strategies]

    def t(self, fn: Any, repeats: int | None = None) -> float:
        return time_ms(fn, self.device, repeats or self.bp.repeats, self.bp.warmup)

    def stats(self, key: str, fn: Any) -> dict[str, Any]:
        """``{key: median ms, key_range: [min, max]}`` of the preset's repeats of ``fn``."""
        return median_range(key, time_samples(fn, self.device, self.bp.repeats, self.bp.warmup))

    def prefill(self, lm: torch.nn.Module, forward: Any) -> dict[str, Any]:
        """TTFT of ``forward`` (median, range) and the median time of ``lm`` inside it, both over the
        same timed repeats: the LLM timer is attached after the warm-up, so it never sees a first call."""
        for _ in range(self.bp.warmup):
            forward()
        timer = _LMTimer(lm, self.device)
        try:
            out = median_range("ttft_ms", time_samples(forward, self.device, self.bp.repeats, 0))
            out["llm_ms"] = timer.median_ms()
        finally:
            timer.close()
        return out

    def decode(self, generate: Any, prompt_len: int, batch: int) -> dict[str, Any]:
        """Decode tok/s (median, range) of greedy ``generate`` calls and the new tokens of each."""
        rates, new = decode_samples(generate, prompt_len, batch, max(3, self.bp.repeats // 2), self.bp.warmup)
        return {**median_range("decode_tok_s", rates), "decode_new_tokens": new}

    # -- one (model, batch): unpruned, ideal per budget, every strategy per budget ---------------
    @torch.no_grad()
    def model_batch(self, mp: ModelPreset, model: Any, family: Any, batch: int, bar: Any) -> None:
        inputs = _inputs(mp, model, family, batch, self.device)
        core, ids = model.model, inputs["input_ids"]
        tok = placeholder_id(mp, family)
        n_in = int((ids[0] == tok).sum())

        def forward() -> Any:
            return model(**inputs, logits_to_keep=1, use_cache=False)

        def generate(clock: TokenClock) -> Any:
            # min_new_tokens: a random-weight model may pick EOS at once; the rate needs every step
            d = self.bp.decode_tokens
            return model.generate(**inputs, max_new_tokens=d, min_new_tokens=d, do_sample=False, streamer=clock)

        def vision() -> Any:
            return _vision_call(core, inputs)

        def measure(decode: bool) -> dict[str, Any]:
            with OtherWork() as others:
                out = {**self.prefill(core.language_model, forward), **self.stats("vision_ms", vision),
                       "peak_mb": peak_mb(forward, self.device),
                       "kv_mb": cache_mb(output_cache(model(**inputs, logits_to_keep=1, use_cache=True)))}
                if decode:
                    out.update(self.decode(generate, ids.shape[1], batch))
            return {**out, "others_cpu": others.share}

        base = measure(decode=True)
        bar.update()
        emb_full = None   # LLaVA images: the ideal feeds the LLM embeddings by hand; else it slices
        if family.tokens_per_image is not None and not mp.video_frames:
            emb = core.get_input_embeddings()(ids)
            emb_full = emb.masked_scatter((ids == family.image_token_id)[..., None],
                                          _features(vision()).to(emb.dtype))
        ideal_cache: dict[int, dict[str, Any]] = {}
        for budget in mp.budgets:
            for name in self.strategies_for(mp):
                h = tokenprune.apply(model, name, budget=budget, **mp.options.get(name, {}))
                try:
                    res = measure(decode=budget == min(mp.budgets))
                    st = h.last_stats
                    kept = [[t.clone() for t in row] for row in st.kept_indices]
                    row = {"model": mp.name, "batch": batch, "strategy": name, "tokens_in": n_in,
                           "kept": int(st.visual_tokens_kept[0]), "prune_ms": st.prune_ms,
                           "flops_ratio": st.flops_after / st.flops_before, **res}
                except Exception as e:  # noqa: BLE001 -- one failing case must not lose the run's others
                    self.errors.append({"model": mp.name, "batch": batch, "strategy": name, "budget": budget,
                                        "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
                    print(f"bench: {mp.name} bs={batch} {name} budget={budget} failed: {type(e).__name__}: {e}")
                    bar.update()
                    continue
                finally:
                    h.remove()
                if budget not in ideal_cache:
                    ideal_cache[budget] = self.ideal(model, family, inputs, emb_full, kept, tok)
                ideal = ideal_cache[budget]
                row.update({f"ideal_{k}": v for k, v in ideal.items()})
                row.update({f"unpruned_{k}": v for k, v in base.items()})
                row["pruned_over_unpruned"] = row["ttft_ms"] / base["ttft_ms"]
                row["pruned_over_ideal"] = row["ttft_ms"] / ideal["ttft_ms"]
                # what selecting costs: the extra time of the patched vision pass (+ FastV's inner
                # scoring, inside llm_ms) relative to the unpruned time to first token
                row["overhead_share"] = (row["ttft_ms"] - ideal["ttft_ms"]) / base["ttft_ms"]
                p = self.paired(model, family, inputs, emb_full, kept, tok, name,
                                {"budget": budget, **mp.options.get(name, {})})
                row["paired"] = p
                row["paired_pruned_over_unpruned"] = p["pruned_ms"] / p["unpruned_ms"]
                row["paired_pruned_over_ideal"] = p["pruned_ms"] / p["ideal_ms"]
                self.rows.append(_checked(row, check_row(row, self.bp.decode_tokens), noisy(row)))
                bar.update()

    @torch.no_grad()
    def ideal(self, model: Any, family: Any, inputs: dict[str, torch.Tensor], emb_full: torch.Tensor | None,
              kept: list[list[torch.Tensor]], token_id: int) -> dict[str, Any]:
        """The unpatched model fed only the kept visual tokens (compact positions, no scoring); by
        hand from ``emb_full`` (LLaVA images), else by slicing the model's own LLM input."""
        core, ids = model.model, inputs["input_ids"]
        keep = _kept_mask(ids, token_id, kept)
        if emb_full is None:
            with OtherWork() as others:
                out = self.ideal_sliced(model, inputs, keep)
            return {**out, "others_cpu": others.share}
        b = ids.shape[0]
        emb_kept = emb_full[keep].reshape(b, -1, emb_full.shape[-1])
        mask_kept = torch.ones(emb_kept.shape[:2], dtype=torch.long, device=ids.device)
        forward = _hand_ideal(model, family, inputs, keep)

        def llm() -> Any:
            return core.language_model(inputs_embeds=emb_kept, attention_mask=mask_kept, use_cache=False)
        with OtherWork() as others:
            res = {**self.stats("ttft_ms", forward), "llm_ms": self.t(llm), "peak_mb": peak_mb(forward, self.device),
                   "kv_mb": cache_mb(output_cache(core.language_model(inputs_embeds=emb_kept, attention_mask=mask_kept,
                                                                use_cache=True)))}
        return {**res, "others_cpu": others.share}

    @torch.no_grad()
    def paired(self, model: Any, family: Any, inputs: dict[str, torch.Tensor], emb_full: torch.Tensor | None,
               kept: list[list[torch.Tensor]], token_id: int, strategy: str, params: dict[str, Any]) -> dict[str, Any]:
        """TTFT of unpruned / pruned / ideal in interleaved rounds (:func:`interleaved`): the ratios a
        slow spell of the machine cannot bend; the median, range and rounds of each."""
        def unpruned() -> Any:
            return model(**inputs, logits_to_keep=1, use_cache=False)

        keep = _kept_mask(inputs["input_ids"], token_id, kept)
        ideal = _SlicedIdeal(model, inputs, keep) if emb_full is None else _hand_ideal(model, family, inputs, keep)
        fns = {"unpruned": unpruned, "pruned": Patched(model, strategy, params, unpruned), "ideal": ideal}
        out = paired_stats(interleaved(fns, self.device, self.bp.repeats, self.bp.warmup))
        others = gpu_other_processes()
        if others is not None:
            out["gpu_other_processes"] = others
        return out

    @torch.no_grad()
    def ideal_sliced(self, model: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, Any]:
        """Ideal for families whose LLM inputs the model builds itself (Qwen: M-RoPE positions,
        DeepStack): see :class:`_SlicedIdeal`; the kept tokens keep their original positions."""
        ideal = _SlicedIdeal(model, inputs, keep)
        ideal.enter()
        try:
            out = self.prefill(model.model.language_model, ideal)
            out["peak_mb"] = peak_mb(ideal, self.device)
            out["kv_mb"] = cache_mb(output_cache(ideal(use_cache=True)))
        finally:
            ideal.leave()
        return out

    # -- vision: SDPA vs our capture vs official-style eager + output_attentions -----------------
    @torch.no_grad()
    def vision(self, mp: ModelPreset, model: Any, family: Any, batch: int, eager: Any) -> None:
        inputs = _inputs(mp, model, family, batch, self.device)
        px, core = inputs["pixel_values"], model.model
        budget = mp.budgets[0]
        sdpa = self.t(lambda: core.get_image_features(pixel_values=px))
        for name in [s for s in self.bp.reference if s in self.strategies]:
            h = tokenprune.apply(model, name, budget=budget, **mp.options.get(name, {}))
            try:
                ours = self.t(lambda: core.get_image_features(pixel_values=px))
                model(**inputs, logits_to_keep=1, use_cache=False)
                ours_kept = [row[0] for row in h.last_stats.kept_indices]
                spec, cfg = h.spec, h.config
            finally:
                h.remove()
            official = self.t(lambda spec=spec, cfg=cfg: official_select(family, eager, spec, cfg, budget, px))
            ref_kept, _ = official_select(family, eager, spec, cfg, budget, px)
            agree = sum(len(set(a.tolist()) & set(r.tolist())) for a, r in zip(ours_kept, ref_kept))
            v = {"model": mp.name, "batch": batch, "strategy": name, "kept": budget, "sdpa_ms": sdpa,
                 "ours_ms": ours, "official_ms": official, "ours_overhead": ours / sdpa - 1,
                 "official_overhead": official / sdpa - 1, "agreement": agree / (budget * len(ref_kept))}
            self.vision_rows.append(_checked(v, check_vision_row(v), []))

    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        n = sum(len(m.batches) * (1 + len(m.budgets) * len(self.strategies_for(m))) for m in self.bp.models)
        interrupted = False
        with tqdm(total=n, desc="bench") as bar, OtherWork() as others:
            try:
                self._run_models(bar)
            except KeyboardInterrupt:  # SIGINT / SIGTERM (e.g. `timeout`): keep what was measured
                interrupted = True
        import transformers
        return {"machine": machine(self.device), "device": self.device, "torch": torch.__version__,
                "transformers": transformers.__version__, "repeats": self.bp.repeats,
                "warmup": self.bp.warmup, "decode_tokens": self.bp.decode_tokens, "interrupted": interrupted,
                "others_cpu": others.share, "cpus": os.cpu_count(), "memory": peak_method(self.device),
                "decode": "batch x (tokens - 1) / time from the first to the last new token inside each generate call",
                "gc": "cyclic garbage collector off while timing",
                "sanity_failures": sum(bool(r["sanity"]) for r in self.rows + self.vision_rows),
                "rows": self.rows, "vision_rows": self.vision_rows, "errors": self.errors}

    def _run_models(self, bar: Any) -> None:
        for mp in self.bp.models:
            model = build(mp, self.device)
            family = family_for(model)
            # official-style reference (eager tower + output_attentions): LLaVA-1.5 only
            plain = family.name == "llava" and not mp.video_frames
            eager = eager_copy(family.vision_tower) if plain else None
            try:
                for batch in mp.batches:
                    bar.set_postfix_str(f"{mp.name} bs={batch}")
                    self.model_batch(mp, model, family, batch, bar)
                if plain:
                    for batch in sorted(set(mp.batches) | ({self.bp.capture_batch} - {None})):
                        self.vision(mp, model, family, batch, eager)
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory: go on with the next model
                self.errors.append({"model": mp.name, "error": f"{type(e).__name__}: {e}",
                                    "trace": traceback.format_exc()})
                print(f"bench: {mp.name} failed: {type(e).__name__}: {e}")
            del model, eager, family
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()


DESCRIPTION = ("Speed and memory benchmark of visual-token pruning: time to first token, decode tokens/s, peak "
               "memory and KV cache of the pruned model against the unpruned one and the ideal (the unpatched "
               "model fed only the kept visual tokens), per model x batch x budget x strategy, on random-weight "
               "models (no download).")
#: optional packages (the [eval] extra) the bench imports: checked before any work is done
NEEDS = ("matplotlib", "tqdm")


def require(*modules: str, command: str = "tokenprune bench") -> None:
    """Exit (status 2) with one line naming the missing ``modules`` (the [eval] extra), before
    anything is measured."""
    try:
        require_all(command, *((m, "eval") for m in modules))
    except MissingExtraError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def default_out() -> Path:
    """The user's working folder for results: ``./tokenprune_out/bench`` under the current directory."""
    return extras_default_out("bench")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tokenprune bench", description=DESCRIPTION)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="model geometries and case grid: tiny (smoke test, ~1 min on 2 cores), cpu (mid-size "
                         "configs, minutes), gpu (real-size 7B architectures, one GPU); default: cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--strategies", nargs="*", metavar="NAME",
                    help=f"only these strategies (default: the preset's, {list(PRESETS['cpu'].strategies)})")
    ap.add_argument("--repeats", type=int, metavar="N", help="timed repeats per measurement (default: the preset's)")
    ap.add_argument("--models", nargs="*", metavar="TEXT",
                    help="only the preset's models whose name contains one of these "
                         f"(tiny: {', '.join(repr(m.name) for m in PRESETS['tiny'].models)})")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="folder for bench_<preset>.{json,md} and its plots (default: ./tokenprune_out/bench)")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser()
    a = ap.parse_args(argv)
    require(*NEEDS)
    from .report import write

    bp = PRESETS[a.preset]
    if a.repeats is not None:
        if a.repeats < 1:
            ap.error("--repeats must be >= 1")
        bp = replace(bp, repeats=a.repeats)
    if a.models:
        bp = replace(bp, models=tuple(m for m in bp.models if any(k in m.name for k in a.models)))
        if not bp.models:
            ap.error(f"--models {' '.join(a.models)} matches none of {[m.name for m in PRESETS[a.preset].models]}")
    out = a.out or default_out()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    res = Bench(bp, a.device, a.strategies).run()
    res["preset"] = a.preset
    md, paths = write(res, out, f"bench_{a.preset}")
    print(md)
    print(f"bench: wrote {', '.join(p.name for p in paths)} to {out.resolve()}")
    if res["sanity_failures"]:
        print(f"bench: warning: {res['sanity_failures']} row(s) fail a sanity check (flagged in the table)", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
