"""The public conformance kit: the design's invariants as one pytest suite over family cases x
strategies, deriving what it checks (stage, scored layers, the reference selection of inner-LLM
strategies) from each strategy's own spec.

A third party checks its strategy on every built-in family, or its family with every strategy::

    # test_my_plugin.py
    from tokenprune.testing import ConformanceSuite, FamilyCase, builtin_cases

    class TestMyStrategy(ConformanceSuite):
        cases = builtin_cases()              # or [FamilyCase("mine", build=..., inputs=...)]
        strategies = ["my_method", ("my_method", {"alpha": 0.5})]

Each test gets a deep copy of the case's model (built once per class). A strategy the family cannot
serve must be refused with :class:`~tokenprune.IncompatibleStrategyError` (checked) and its other
tests are skipped. Needs pytest (the ``dev`` extra); nothing here is imported by the core.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import pytest
import torch
from torch import nn

from . import api, registry
from .errors import IncompatibleStrategyError, UnsupportedCallError
from .sequence import output_cache
from .strategies.base import LLMTokens, Selection

NEW = 4   #: tokens generated per check


@dataclass
class FamilyCase:
    """A tiny model of one family's real class and inputs for it.

    ``build(dtype)``: a model in eval mode; ``inputs(seed)``: one prompt with its visual inputs (a
    batch row of 1); ``batch()``: optionally, a left-padded batch of rows with different visual
    inputs and the same rows alone; ``suppress``: token ids generation must not emit (placeholder
    ids: an uncached step re-feeds the generated tokens with the pixels); ``extra``:
    ``positions_from_mask=True`` numbers a padded batch's plain forward from its mask, as
    ``generate`` does (families with 1-D positions)."""

    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    batch: Callable[[], tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]] | None = None
    suppress: tuple[int, ...] = ()
    #: the families the hand-fed reference cannot feed through ``inputs_embeds`` alone
    deepstack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"FamilyCase({self.name})"


def builtin_cases() -> list[FamilyCase]:
    """The six built-in families as tiny random models with their real classes and processors."""
    from .eval import tiny as t

    def llava_inputs(seed: int, n_images: int = 1) -> dict[str, torch.Tensor]:
        ids = t.prompt_ids(64, n_images=n_images, seed=seed)
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(n_images, 3, 112, 112, generator=g)}

    def llava_batch():
        rows = [llava_inputs(1, 1), llava_inputs(2, 2)]
        ids, mask = t.batch_prompts([r["input_ids"] for r in rows])
        return ({"input_ids": ids, "attention_mask": mask,
                 "pixel_values": torch.cat([r["pixel_values"] for r in rows])}, rows)

    def qwen(kind: str) -> FamilyCase:
        def inputs(seed: int) -> dict[str, torch.Tensor]:
            return t.qwen_inputs(kind, images=[(8, 12)], videos=[(2, 8, 8)], seed=seed)

        def batch():
            rows = [t.qwen_inputs(kind, images=[(8, 12)], seed=1),
                    t.qwen_inputs(kind, images=[(12, 8), (8, 8)], videos=[(2, 8, 8)], seed=2)]
            return t.qwen_batch(kind, rows), rows
        return FamilyCase(kind, build=lambda dtype=torch.float32: t.build_qwen(kind, dtype=dtype), inputs=inputs,
                          batch=batch, suppress=tuple(t.QWEN_IDS.values()), deepstack=kind == "qwen3_vl")

    def anyres(kind: str) -> FamilyCase:
        proc = t.build_anyres_processor(kind)

        def inputs(seed: int) -> dict[str, torch.Tensor]:
            kw: dict[str, Any] = {"images": [t.random_image(84, 112, seed)]}
            if kind == "llava_onevision":
                kw["videos"] = [t.random_video(4, 60, 60, seed + 5)]
            return t.anyres_inputs(proc, **kw)

        def batch():
            """Two images of different aspect ratios (different placeholder runs), left-padded."""
            imgs = [t.random_image(84, 112, 1), t.random_image(150, 60, 2)]
            proc.tokenizer.padding_side = "left"
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]
            texts = [proc.apply_chat_template(chat, add_generation_prompt=True)] * 2
            rows = [t.anyres_inputs(proc, images=[im]) for im in imgs]
            return dict(proc(text=texts, images=imgs, return_tensors="pt", padding=True)), rows
        return FamilyCase(kind, build=lambda dtype=torch.float32: t.build_anyres(kind, dtype=dtype), inputs=inputs,
                          batch=batch, suppress=tuple(t.ANYRES_IDS.values()), extra={"positions_from_mask": True})

    return [FamilyCase("llava", build=lambda dtype=torch.float32: t.build_llava(dtype=dtype),
                       inputs=llava_inputs, batch=llava_batch, suppress=(4,), extra={"positions_from_mask": True}),
            anyres("llava_next"), anyres("llava_onevision"), qwen("qwen2_vl"), qwen("qwen2_5_vl"), qwen("qwen3_vl")]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def hook_snapshot(model: Any) -> dict[str, tuple[int, int, list[str]]]:
    """Hook counts and attribute names of every module: what ``remove()`` must restore exactly."""
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), sorted(vars(m)))
            for name, m in model.named_modules()}


def cache_kwarg() -> str:
    """``cache`` where transformers has it (5.2x), else ``past_key_values`` (``cache=`` is ignored there)."""
    from transformers import GenerationMixin

    return "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
        else "past_key_values"


@torch.no_grad()
def generate(model: Any, inp: dict[str, Any], case: FamilyCase, **kw: Any) -> Any:
    kw.setdefault("do_sample", False)
    if case.suppress:
        kw.setdefault("suppress_tokens", list(case.suppress))
    return model.generate(**inp, max_new_tokens=NEW, min_new_tokens=NEW, **kw)


def _lm(model: Any) -> nn.Module:
    return api.family_for(model).language_model


class LMInputs:
    """Captures the keyword arguments of the language model's first call (a pre-hook registered
    after the handle's sees what the pruned model fed it)."""

    def __init__(self, model: nn.Module) -> None:
        self.kwargs: dict[str, Any] | None = None
        self._h = _lm(model).register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.kwargs is None:
            self.kwargs = dict(kwargs)

    def close(self) -> dict[str, Any]:
        self._h.remove()
        assert self.kwargs is not None, "the language model was not called"
        return self.kwargs


def placeholder_runs(model: Any, inp: dict[str, Any], kept: list[torch.Tensor]) -> list[torch.Tensor]:
    """Columns of row 0's placeholder runs, in the order of ``kept_indices`` (images, then videos),
    cut by the lengths the stats report per run."""
    family = api.family_for(model)
    masks = family.placeholder_masks((), inp)
    out: list[torch.Tensor] = []
    order = [m for m in family.pixel_keys if m in masks and bool(masks[m].any())]
    counts = family.placeholder_counts((), inp)
    for m in order:
        cols = torch.nonzero(masks[m][0]).flatten()
        if counts is None:                      # a fixed grid: runs of tokens_per_image
            n_img = family.tokens_per_image or int(cols.numel())
            sizes = [n_img] * (int(cols.numel()) // n_img)
        else:
            sizes = counts.get(m) or [int(cols.numel())]
        start = 0
        for n in sizes:
            out.append(cols[start:start + n])
            start += n
    return out


def keep_mask(model: Any, inp: dict[str, Any], kept: list[torch.Tensor]) -> torch.Tensor:
    """[L] bool over row 0: text tokens and the kept placeholder tokens."""
    family = api.family_for(model)
    visual = torch.stack([v for v in family.placeholder_masks((), inp).values() if v is not None]).any(0)[0]
    keep = ~visual
    for run, k in zip(placeholder_runs(model, inp, kept), kept):
        keep[run[k]] = True
    return keep


def gather_lm_kwargs(kw: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The language model's call for one row, with only the ``keep`` [L] tokens, sliced by a
    family-agnostic rule: per-token tensors along their sequence axis; per-visual-token row lists
    (DeepStack) to the kept visual rows."""
    idx = torch.nonzero(keep).flatten()
    length = keep.numel()
    kw = dict(kw)
    if kw.get("position_ids") is None:      # the model would number the sliced sequence afresh
        kw["position_ids"] = torch.arange(length)[None]
    out = dict(kw)
    vpm = kw.get("visual_pos_masks")
    for key, v in kw.items():
        if torch.is_tensor(v):
            if v.dim() >= 2 and v.shape[1] == length and key in ("inputs_embeds", "visual_pos_masks"):
                out[key] = v[:, idx]
            elif v.shape[-1] == length and key in ("position_ids", "attention_mask", "token_type_ids"):
                out[key] = v[..., idx]
        elif key == "deepstack_visual_embeds" and v is not None and vpm is not None:
            rows = keep[vpm[0]]
            out[key] = [e[rows.to(e.device)] for e in v]
    if out.get("attention_mask") is None:
        out["attention_mask"] = torch.ones(1, int(idx.numel()), dtype=torch.long)
    out.pop("cache", None)
    out.pop("past_key_values", None)
    out["use_cache"] = False
    return out


@torch.no_grad()
def hand_fed_logits(clean: Any, inp: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """Logits of the *unpatched* model whose language model is fed only the ``keep`` tokens of its
    own input (embeddings, original positions, masks, DeepStack rows), sliced here."""
    cap = LMInputs(clean)
    clean(**inp)
    kw = gather_lm_kwargs(cap.close(), keep)
    hidden = _lm(clean)(**kw).last_hidden_state
    return clean.lm_head(hidden)


@torch.no_grad()
def eager_attention(clean: Any, inp: dict[str, Any], layer: int) -> torch.Tensor:
    """[B, H, L, L] attention probabilities of decoder ``layer`` from an eager copy of ``clean``
    (``output_attentions``), read from that layer's own attention module: the model's
    ``attentions`` tuple counts only the layers that record attention (a hybrid LLM's
    linear-attention layers record none), so it is not indexed by decoder layer."""
    m = copy.deepcopy(clean)
    m.set_attn_implementation({"text_config": "eager"})
    got: list[torch.Tensor] = []

    def grab(mod: nn.Module, a: tuple, out: Any) -> None:
        got.append(out[1])
    hook = api.family_for(m).llm_attention(layer).module.register_forward_hook(grab)
    try:
        m(**inp, output_attentions=True)
    finally:
        hook.remove()
    return got[0]


@torch.no_grad()
def eager_last_row(clean: Any, inp: dict[str, Any], layer: int) -> torch.Tensor:
    """[L] head-mean attention of row 0's last token at decoder ``layer``, from an eager copy
    (``output_attentions``): the reference inner-LLM strategies rank by."""
    return eager_attention(clean, inp, layer)[0].float().mean(0)[-1]


@torch.no_grad()
def eager_signals(clean: Any, inp: dict[str, Any], layer: int, signals: frozenset[str],
                  hidden_layer: int | None = None) -> dict[str, Any]:
    """Row 0's inner-LLM signals at stage 0 from the *unpatched* model, computed independently of
    the engine: ``attention`` [L, L] head-mean rows of decoder ``layer`` = K-1 (an eager copy with
    ``output_attentions``), ``keys`` [L, Hkv*d] (that layer's key projection, rotated with the
    family's rotary), ``hidden`` [L, D] (the hidden states entering layer K), ``embeds`` [L, D]
    (the LLM input) and ``final_norm``. ``hidden_layer``: K, when the scoring layer is not K-1
    (a hybrid LLM's full-attention layer below it)."""
    out: dict[str, Any] = {}
    if signals & {"attention", "text_attention"}:
        out["attention"] = eager_attention(clean, inp, layer)[0].float().mean(0)
    family = api.family_for(clean)
    got: dict[str, Any] = {}
    hooks = []
    if "keys" in signals:
        la = family.llm_attention(layer)
        hooks.append(la.k_source.register_forward_hook(lambda mod, a, o: got.setdefault("k", o)))
        hooks.append(la.module.register_forward_pre_hook(
            lambda mod, a, kw: got.setdefault("pe", kw.get("position_embeddings")) and None, with_kwargs=True))
    if "hidden" in signals:    # what layer K receives (DeepStack adds features after layer K-1's output)
        def grab(mod: nn.Module, a: tuple, kw: dict[str, Any]) -> None:
            got.setdefault("h", a[0] if a else kw["hidden_states"])
        k = layer + 1 if hidden_layer is None else hidden_layer
        hooks.append(family.decoder_layers[k].register_forward_pre_hook(grab, with_kwargs=True))
    cap = LMInputs(clean)
    try:
        clean(**inp)
    finally:
        for hk in hooks:
            hk.remove()
    out["embeds"] = cap.close()["inputs_embeds"][0]
    if "hidden" in signals:
        out["hidden"] = got["h"][0]
        out["final_norm"] = family.llm_final_norm()
    if "keys" in signals:
        k = got["k"]
        n = k.shape[1]
        kk = k.reshape(1, n, la.num_kv_heads, la.head_dim).transpose(1, 2)
        cos, sin = got["pe"]
        out["keys"] = la.rotary(kk, cos[:1], sin[:1]).transpose(1, 2).reshape(n, -1)
    return out


def reference_tokens(sig: dict[str, Any], signals: frozenset[str], run: torch.Tensor, content: torch.Tensor,
                     text: torch.Tensor) -> Any:
    """The :class:`LLMTokens` stage 0 of a run gets, from :func:`eager_signals` (row 0)."""
    cols = run[content]
    t = LLMTokens(stage=0, n_in=int(content.numel()))
    if "attention" in signals:
        t.attention = sig["attention"][-1, cols]
    if "text_attention" in signals:
        t.text_attention = sig["attention"][text][:, cols]
    if "keys" in signals:
        t.keys, t.text_keys = sig["keys"][cols], sig["keys"][text]
    if "hidden" in signals:
        t.hidden, t.text_hidden, t.final_norm = sig["hidden"][cols], sig["hidden"][text], sig["final_norm"]
    if "embeds" in signals:
        t.embeds, t.text_embeds = sig["embeds"][cols], sig["embeds"][text]
        t.alive = torch.arange(cols.numel())
    return t


# ----------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------

def _norm(strategies: Sequence[Any]) -> list[tuple[str, dict[str, Any], Any]]:
    """Names, (name, params) or (name, params, inner) -> (name, params, inner)."""
    out: list[tuple[str, dict[str, Any], Any]] = []
    for s in strategies:
        if isinstance(s, str):
            out.append((s, {}, None))
        elif len(s) == 2:
            out.append((s[0], dict(s[1]), None))
        else:
            out.append((s[0], dict(s[1]), s[2]))
    return out


def _label(name: str, params: dict[str, Any], inner: Any) -> str:
    tag = name + "".join(f"-{k}={v}" for k, v in params.items())
    return tag + (f"+{inner[0]}" if inner else "")


class ConformanceSuite:
    """Subclass with ``cases`` and ``strategies`` to get one test per invariant x case x strategy.
    ``keep``: the fraction pruned runs keep (fixed-grid families also check exact ``budget``s)."""

    cases: ClassVar[Sequence[FamilyCase]] = ()
    strategies: ClassVar[Sequence[Any]] = ()
    keep: ClassVar[float] = 0.3
    _models: ClassVar[dict[tuple[str, str], Any]]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        combos = [(c, s) for c in cls.cases for s in _norm(cls.strategies)]
        cls._models = {}
        if not combos:
            return

        @pytest.fixture(params=combos, ids=[f"{c.name}-{_label(*s)}" for c, s in combos])
        def combo(self: Any, request: Any) -> tuple[FamilyCase, tuple[str, dict[str, Any], Any]]:
            return request.param
        cls.combo = combo  # type: ignore[attr-defined]

    # -- per-test set-up --------------------------------------------------------------------
    def model_for(self, case: FamilyCase, dtype: torch.dtype = torch.float32) -> Any:
        key = (case.name, str(dtype))
        if key not in self._models:
            self._models[key] = case.build(dtype=dtype)
        return copy.deepcopy(self._models[key])

    def fits(self, model: nn.Module, name: str, params: dict[str, Any], inner: Any) -> bool:
        """Whether the family serves the strategy; if not, the refusal must be typed and clean."""
        family = api.family_for(model)
        needs = set(registry.get_strategy(name).needs)
        if inner is not None:
            needs |= set(registry.get_strategy(inner[0]).needs)
        if needs <= family.provides:
            return True
        before = hook_snapshot(model)
        with pytest.raises(IncompatibleStrategyError):
            api.apply(model, name, inner=inner, keep=self.keep, **params)
        assert hook_snapshot(model) == before and api.get_handle(model) is None
        return False

    def setup_combo(self, combo: Any, dtype: torch.dtype = torch.float32):
        case, (name, params, inner) = combo
        model = self.model_for(case, dtype)
        if not self.fits(model, name, params, inner):
            pytest.skip(f"{case.name} cannot serve {name} (refused with IncompatibleStrategyError, checked)")
        return case, name, params, inner, model

    def apply(self, model: nn.Module, name: str, params: dict[str, Any], inner: Any, **kw: Any):
        kw = kw or {"keep": self.keep}
        return api.apply(model, name, inner=inner, **kw, **params)

    # -- invariants -------------------------------------------------------------------------
    def test_keep_one_is_bit_identical(self, combo: Any) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        inp = case.inputs(0)
        with torch.no_grad():
            ref = model(**inp).logits
        ref_gen = generate(model, inp, case)
        inner1 = None if inner is None else (inner[0], {**inner[1], "keep": 1.0})
        with api.apply(model, name, inner=inner1, keep=1.0, **params) as h:
            with torch.no_grad():
                assert torch.equal(model(**inp).logits, ref)
            assert torch.equal(generate(model, inp, case), ref_gen)
            st = h.last_stats
            assert st is not None and st.visual_tokens_kept == st.visual_tokens_in

    def test_remove_restores_exactly(self, combo: Any) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        inp = case.inputs(0)
        with torch.no_grad():
            ref = model(**inp).logits     # first: transformers adds its own hooks lazily
        generate(model, inp, case)
        before, cfg = hook_snapshot(model), model.config.to_dict()
        h = self.apply(model, name, params, inner)
        with torch.no_grad():
            assert model(**inp).logits.shape[1] < ref.shape[1]
        generate(model, inp, case)
        h.remove()
        assert hook_snapshot(model) == before and model.config.to_dict() == cfg
        assert api.get_handle(model) is None
        with torch.no_grad():
            assert torch.equal(model(**inp).logits, ref)
        self.apply(model, name, params, inner).remove()

    def test_kept_tokens_reach_the_llm_exactly(self, combo: Any) -> None:
        """The LLM (from layer K for inner stages) sees the text and exactly the kept tokens; kept
        indices are ascending and unique; fixed grids keep exactly ``tokens_for`` per image."""
        case, name, params, inner, model = self.setup_combo(combo)
        inp = case.inputs(0)
        h = self.apply(model, name, params, inner)
        family = h.family
        lengths: dict[int, int] = {}
        layers = {0} | set(h.llm_layers)
        hooks = [family.decoder_layers[i].register_forward_pre_hook(
            lambda m, a, k, i=i: lengths.setdefault(i, (a[0] if a else k["hidden_states"]).shape[1]) and None,
            with_kwargs=True) for i in layers]
        with torch.no_grad():
            model(**inp)
        for hk in hooks:
            hk.remove()
        st = h.last_stats
        n_text = inp["input_ids"].shape[1] - st.visual_tokens_in[0]
        at_input = st.visual_tokens_kept[0] if h.vspec is not None else st.visual_tokens_in[0]
        assert lengths[0] == n_text + at_input
        if h.llm_layer is not None:
            inner_kept = st.inner_tokens_kept[0] if h.vspec is not None else st.visual_tokens_kept[0]
            assert lengths[h.llm_layer] == n_text + inner_kept
            for stage in st.stages:          # every stage: the text and exactly what it kept
                assert lengths[stage.layer] == n_text + stage.tokens_kept[0]
        for k in st.kept_indices[0]:
            assert torch.equal(k, torch.unique(k))
        if family.tokens_per_image is not None and h.vspec is not None:
            n = h.config.tokens_for(family.tokens_per_image)
            assert [k.numel() for k in st.kept_indices[0]] == [n] * len(st.kept_indices[0])

    def test_text_only_call_is_a_pass_through(self, combo: Any) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        ids = torch.tensor([[1, 20, 30, 40, 50]])
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        ref_gen = generate(model, {"input_ids": ids}, case)
        with self.apply(model, name, params, inner) as h:
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, ref)
            assert torch.equal(generate(model, {"input_ids": ids}, case), ref_gen)
            assert h.last_stats is None

    def test_pruned_equals_hand_fed_kept_tokens(self, combo: Any) -> None:
        """Vision stage: the unpatched model whose language model gets only the kept tokens of its
        own input gives the pruned model's logits (merging strategies change the features: skipped)."""
        case, name, params, inner, model = self.setup_combo(combo)
        spec = registry.get_strategy(name)
        if spec.stage != "vision" or inner is not None or (spec.inner is not None):
            pytest.skip("inner-LLM stages: see test_inner_selection_follows_the_strategys_rule")
        clean = copy.deepcopy(model)
        inp = case.inputs(0)
        h = self.apply(model, name, params, inner)
        with torch.no_grad():
            out = model(**inp).logits
        st = h.last_stats
        if st.merge_groups and any(g is not None for row in st.merge_groups for g in row):
            pytest.skip(f"{name} merges features into the kept tokens")
        ref = hand_fed_logits(clean, inp, keep_mask(clean, inp, st.kept_indices[0]))
        torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-5)

    def test_inner_selection_follows_the_strategys_rule(self, combo: Any) -> None:
        """Inner-LLM stage alone: the first stage's kept set is the strategy's own ``select_llm``
        on the signals its spec names, computed from the unpatched model (eager attention, hooked
        keys, output hidden states), per image / video; layout tokens (the family's
        ``structural``) stay and are not counted. Later stages keep subsets of the earlier ones,
        with the spec's counts."""
        case, name, params, inner, model = self.setup_combo(combo)
        spec = registry.get_strategy(name)
        if spec.stage != "llm":
            pytest.skip("vision-stage strategy")
        clean = copy.deepcopy(model)
        inp = case.inputs(0)
        h = self.apply(model, name, params, inner)
        with torch.no_grad():
            model(**inp)
        kept = h.last_stats.kept_indices[0]
        sig = eager_signals(clean, inp, h.score_layers[0], spec.llm_signals, hidden_layer=h.llm_layer)
        length = inp["input_ids"].shape[1]
        fam = h.family
        runs = placeholder_runs(clean, inp, kept)
        with torch.no_grad():
            embeds = LMInputs(clean)
            clean(**inp)
            e = embeds.close()["inputs_embeds"]
        from .state import Span

        spans = [Span(row=0, cols=r, modality="image") for r in runs]
        visual = torch.zeros(length, dtype=torch.bool)
        for r in runs:
            visual[r] = True
        stages = h.last_stats.stages
        assert [st.layer for st in stages] == h.llm_layers
        for j, (got, run, fixed) in enumerate(zip(kept, runs, fam.structural(spans, e))):
            cand = torch.ones(run.numel(), dtype=torch.bool)
            cand[: fam.num_prefix] = False
            cand[fixed] = False
            content = torch.nonzero(cand).flatten()
            text = torch.nonzero((torch.arange(length) > run.max()) & ~visual).flatten()
            n = h.config.tokens_for(content.numel() + fam.num_prefix) - fam.num_prefix
            assert spec.select_llm is not None
            chosen = spec.select_llm(h.config, reference_tokens(sig, spec.llm_signals, run, content, text), n)
            if isinstance(chosen, Selection):
                chosen = chosen.indices
            want = torch.sort(torch.cat([torch.nonzero(~cand).flatten(), content[chosen.cpu()]])).values
            assert torch.equal(got, want)
            alive = n
            for s, st in enumerate(stages[1:], start=1):   # nested, with the spec's counts
                prev, now = stages[s - 1].kept_indices[0][j], st.kept_indices[0][j]
                assert bool(torch.isin(now, prev).all())
                if spec.llm_budget is not None:
                    alive = max(0, min(spec.llm_budget(h.config, s, n, int(content.numel())), alive))
                    assert now.numel() == alive + int((~cand).sum())

    def test_cached_equals_uncached(self, combo: Any) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        inp = case.inputs(3)
        self.apply(model, name, params, inner)
        g = generate(model, inp, case, output_scores=True, return_dict_in_generate=True)
        g2 = generate(model, inp, case, use_cache=False, output_scores=True, return_dict_in_generate=True)
        assert torch.equal(g.sequences, g2.sequences)
        for a, b in zip(g.scores, g2.scores):
            torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5)

    def test_padded_batch_equals_one_by_one(self, combo: Any) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        if case.batch is None:
            pytest.skip(f"{case.name} gives no batch")
        batch, rows = case.batch()
        h = self.apply(model, name, params, inner)
        if h.lspec is not None and not h.family.inner_ghosts:
            # documented: rows that would need ghost padding are refused (one row per call); rows
            # that drop equally many run batched and are checked below like any batch
            try:
                with torch.no_grad():
                    model(**batch)
            except UnsupportedCallError as e:
                assert "one row at a time" in str(e)
                return
        fwd = dict(batch)
        if case.extra.get("positions_from_mask") and "position_ids" not in fwd:
            # number a left-padded row as generate does (and as it is alone): methods reading
            # rotated keys (DART's key norms) depend on absolute positions, not only relative ones
            fwd["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(**fwd).logits
        gen = generate(model, batch, case)
        st_b = h.last_stats
        for r, single in enumerate(rows):
            with torch.no_grad():
                o = model(**single).logits
            g = generate(model, single, case)
            torch.testing.assert_close(out[r, -1], o[0, -1], atol=5e-5, rtol=1e-4)
            assert torch.equal(gen[r, -NEW:], g[0, -NEW:])
            assert all(torch.equal(a, b) for a, b in zip(st_b.kept_indices[r], h.last_stats.kept_indices[0]))

    def test_no_eager_fallback_and_only_the_specs_layers_scored(self, combo: Any, monkeypatch: Any) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        inp = case.inputs(0)
        calls = {"n": 0}
        real = torch.nn.functional.scaled_dot_product_attention

        def counting(*a: Any, **k: Any) -> Any:
            calls["n"] += 1
            return real(*a, **k)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        impl = (model.config.get_text_config()._attn_implementation,)
        with torch.no_grad():
            model(**inp)
        unpatched, calls["n"] = calls["n"], 0
        h = self.apply(model, name, params, inner)
        with torch.no_grad():
            model(**inp)
        assert calls["n"] == unpatched > 0
        assert (model.config.get_text_config()._attn_implementation,) == impl
        want = set()
        if h.vspec is not None:
            want |= {("vision", r.layer) for r in h.vspec.requests(h.vconfig, h.family.vision_info)}
        if h.lspec is not None and h.lspec.llm_signals & {"attention", "text_attention", "keys"}:
            got = h.lspec.llm_layer(h.lconfig, h.family.llm_info)
            want |= {("llm", h.family.llm_scoring_layer(k - 1)) for k in ([got] if isinstance(got, int) else got)}
        assert set(h.scored_layers) == want

    def test_bfloat16(self, combo: Any) -> None:
        case, name, params, inner, _ = self.setup_combo(combo)
        model = self.model_for(case, torch.bfloat16)
        inp = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in case.inputs(0).items()}
        with torch.no_grad():
            ref = model(**inp).logits
        with api.apply(model, name, keep=1.0, **params):
            with torch.no_grad():
                assert torch.equal(model(**inp).logits, ref)
        with self.apply(model, name, params, inner) as h:
            with torch.no_grad():
                out = model(**inp).logits
            g = generate(model, inp, case)
            assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
            assert h.last_stats.visual_tokens_kept[0] < h.last_stats.visual_tokens_in[0]
            assert g.shape[1] == inp["input_ids"].shape[1] + NEW

    def test_accelerate_dispatched_model(self, combo: Any) -> None:
        from accelerate import cpu_offload

        case, name, params, inner, plain = self.setup_combo(combo)
        inp = case.inputs(0)
        probe = copy.deepcopy(plain)
        cpu_offload(probe, execution_device=torch.device("cpu"))
        try:
            with torch.no_grad():
                probe(**inp)
        except Exception as e:  # noqa: BLE001 - the unpatched model's own limit, reported as a skip
            pytest.skip(f"the unpatched {case.name} model already fails under accelerate's cpu_offload: "
                        f"{type(e).__name__}: {e}")
        offloaded = copy.deepcopy(plain)
        with self.apply(plain, name, params, inner):
            with torch.no_grad():
                ref = plain(**inp).logits
        cpu_offload(offloaded, execution_device=torch.device("cpu"))
        with self.apply(offloaded, name, params, inner):
            with torch.no_grad():
                out = offloaded(**inp).logits
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)

    # -- the generation-mode matrix ----------------------------------------------------------
    def test_greedy_sampling_and_dict_output(self, combo: Any) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        inp = case.inputs(0)
        h = self.apply(model, name, params, inner)
        greedy = generate(model, inp, case)
        torch.manual_seed(0)
        s1 = generate(model, inp, case, do_sample=True, top_k=5)
        torch.manual_seed(0)
        s2 = generate(model, inp, case, do_sample=True, top_k=5)
        st = h.last_stats
        assert st is not None and torch.equal(s1, s2) and st.visual_tokens_kept[0] < st.visual_tokens_in[0]
        out = generate(model, inp, case, return_dict_in_generate=True, output_scores=True)
        assert torch.equal(out.sequences, greedy) and len(out.scores) == NEW
        assert torch.equal(torch.stack(out.scores, 1).argmax(-1), greedy[:, inp["input_ids"].shape[1]:])

    def test_static_cache_equals_dynamic_or_is_refused(self, combo: Any) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        inp = case.inputs(0)
        h = self.apply(model, name, params, inner)
        if h.lspec is not None:   # refused before the language model runs at all
            ran: list[int] = []
            hk = h.family.language_model.register_forward_pre_hook(lambda *a: ran.append(1))
            try:
                with pytest.raises(UnsupportedCallError, match="static KV cache"):
                    generate(model, inp, case, cache_implementation="static")
            finally:
                hk.remove()
            assert not ran
            return
        assert torch.equal(generate(model, inp, case, cache_implementation="static"), generate(model, inp, case))

    def _first_turn(self, model: nn.Module, inp: dict[str, Any], case: FamilyCase):
        out = generate(model, inp, case, return_dict_in_generate=True)
        cache = output_cache(out)
        turn2 = torch.randint(10, 40, (1, 5), generator=torch.Generator().manual_seed(3))
        conv = torch.cat([out.sequences, turn2], 1)
        full = dict(inp, input_ids=conv, attention_mask=torch.ones_like(conv))
        if "mm_token_type_ids" in inp:
            pad = torch.zeros(1, conv.shape[1] - inp["input_ids"].shape[1], dtype=torch.long)
            full["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], pad], 1)
        reuse = {k: v for k, v in full.items() if not k.startswith("pixel_values")}
        return cache, full, reuse, turn2.shape[1]

    def test_second_turn_reusing_the_cache(self, combo: Any) -> None:
        """Vision stage: == a fresh call over the whole conversation. Inner stage and
        instruction-conditioned selections: keep the first turn's kept set (documented) == feeding
        the cache the tokens it lacks by hand."""
        case, name, params, inner, model = self.setup_combo(combo)
        inp = case.inputs(0)
        h = self.apply(model, name, params, inner)
        cache, full, reuse, n_new = self._first_turn(model, inp, case)
        first = h.last_stats.kept_indices[0]
        got = generate(model, reuse, case, **{cache_kwarg(): cache})
        if h.lspec is None and not h.vs.text:
            assert torch.equal(got[:, -NEW:], generate(model, full, case)[:, -NEW:])
            return
        assert all(torch.equal(a, b) for a, b in zip(h.last_stats.kept_indices[0], first))
        cache2, _, _, _ = self._first_turn(model, inp, case)
        n = n_new + 1      # turn 1's last token (never fed) and turn 2
        manual = {k: (v[:, -n:] if k in ("input_ids", "mm_token_type_ids") else v) for k, v in reuse.items()}
        ref = generate(model, manual, case, **{cache_kwarg(): cache2})
        assert torch.equal(got[:, -NEW:], ref[:, -NEW:])

    @pytest.mark.parametrize("mode", [{"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}],
                             ids=["beam3", "return2"])
    def test_beam_search_equals_unpatched_fed_the_kept_tokens(self, combo: Any, mode: dict[str, int]) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        inp = case.inputs(0)
        h = self.apply(model, name, params, inner)
        got = generate(model, inp, case, **mode)
        assert got.shape[0] == mode.get("num_return_sequences", 1)
        merging = h.last_stats.merge_groups and any(g is not None for row in h.last_stats.merge_groups for g in row)
        if h.lspec is not None or case.deepstack or merging:
            # no inputs_embeds form of the ideal: inner stages slice inside the LLM, DeepStack adds
            # features inside it, merging changes them; beam search must still be deterministic
            assert torch.equal(generate(model, inp, case, **mode), got)
            return
        cap = LMInputs(model)
        generate(model, inp, case)
        fed = cap.close()
        h.remove()
        e = fed["inputs_embeds"]
        with torch.no_grad():
            ideal = model.generate(inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long),
                                   position_ids=fed["position_ids"], max_new_tokens=NEW, min_new_tokens=NEW,
                                   do_sample=False, suppress_tokens=list(case.suppress) or None, **mode)
        assert torch.equal(got[:, -NEW:], ideal[:, -NEW:])
