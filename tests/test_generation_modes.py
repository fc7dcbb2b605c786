"""The generation-mode matrix: every family x {a vision-stage strategy, an inner-LLM one, a stacked
pair} x every way of calling ``generate``. Each mode runs and equals its reference where one exists:
static == dynamic cache, uncached == cached, a second turn reusing the first turn's cache == a fresh
call over the whole conversation (vision stage), pruned beam search / ``num_return_sequences`` ==
the unpatched model fed the kept tokens; modes pruning cannot serve raise a typed error before any
layer runs."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

import tokenprune
from tokenprune.eval.tiny import (
    anyres_inputs,
    build_anyres,
    build_anyres_processor,
    build_llava,
    build_qwen,
    prompt_ids,
    qwen_inputs,
    random_image,
    random_video,
)

NEW = 4
#: the cache argument's name: ``cache`` from transformers 5.2x (``past_key_values`` deprecated there),
#: ``past_key_values`` before (where ``cache=`` is silently ignored)
CACHE = "cache" if "cache" in inspect.signature(
    __import__("transformers").GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PAIRS = {"vision": ("hiprune", {"keep": 0.3}, None),
         "inner": ("fastv", {"keep": 0.3}, None),
         "stacked": ("visionzip", {"keep": 0.5}, ("fastv", {"keep": 0.5}))}


def _case(name: str):
    """(model, inputs of one prompt) for a family: an image (and a video where the family has one)."""
    if name == "llava":
        ids = prompt_ids(64, seed=0)
        px = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
        return build_llava(seed=0), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px}
    if name.startswith("qwen"):
        return build_qwen(name), qwen_inputs(name, images=[(8, 12)], videos=[(2, 8, 8)])
    kw = {"images": [random_image(84, 112)]}
    if name == "llava_onevision":
        kw["videos"] = [random_video(4, 60, 60, 5)]
    return build_anyres(name), anyres_inputs(build_anyres_processor(name), **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    model, inp = _case(request.param)
    return request.param, model, inp


@pytest.fixture(params=list(PAIRS))
def patched(fam, request):
    name, base, inp = fam
    model = copy.deepcopy(base)
    s, params, inner = PAIRS[request.param]
    handle = tokenprune.apply(model, s, inner=inner, **params)
    yield name, request.param, model, inp, handle
    handle.remove()


def gen(model, inp, **kw):
    with torch.no_grad():
        return model.generate(**inp, max_new_tokens=NEW, min_new_tokens=NEW, **kw)


def new_tokens(out, inp):
    seqs = out.sequences if hasattr(out, "sequences") else out
    return seqs[:, inp["input_ids"].shape[1]:]


class _Capture:
    """The prefill's language-model inputs as the pruned model fed them (a pre-hook registered after
    the handle's, so it sees the sliced sequence)."""

    def __init__(self, model):
        self.seen: list[dict] = []
        self.h = model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not self.seen:
            self.seen.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})


def test_greedy_sampling_and_dict_output(patched):
    name, kind, model, inp, handle = patched
    greedy = gen(model, inp, do_sample=False)
    assert new_tokens(greedy, inp).shape == (1, NEW)
    torch.manual_seed(0)
    s1 = gen(model, inp, do_sample=True, top_k=5)
    torch.manual_seed(0)
    s2 = gen(model, inp, do_sample=True, top_k=5)
    assert torch.equal(s1, s2) and handle.last_stats.visual_tokens_kept[0] < handle.last_stats.visual_tokens_in[0]
    out = gen(model, inp, do_sample=False, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, greedy) and len(out.scores) == NEW
    assert torch.equal(torch.stack(out.scores, 1).argmax(-1), new_tokens(greedy, inp))


def test_uncached_equals_cached(patched):
    name, kind, model, inp, handle = patched
    cached = gen(model, inp, do_sample=False)
    kept = handle.last_stats.kept_indices
    uncached = gen(model, inp, do_sample=False, use_cache=False)
    assert torch.equal(uncached, cached)
    assert all(torch.equal(a, b) for a, b in zip(handle.last_stats.kept_indices[0], kept[0]))


def test_static_cache_equals_dynamic_or_is_refused(patched):
    name, kind, model, inp, handle = patched
    if handle.lspec is not None:   # refused before the language model runs at all
        ran = []
        h = model.model.language_model.register_forward_pre_hook(lambda *a: ran.append(1))
        try:
            with pytest.raises(tokenprune.UnsupportedCallError, match="static KV cache"):
                gen(model, inp, do_sample=False, cache_implementation="static")
        finally:
            h.remove()
        assert not ran
        return
    assert torch.equal(gen(model, inp, do_sample=False, cache_implementation="static"),
                       gen(model, inp, do_sample=False))


def _turns(model, inp):
    """Turn 1 (greedy, with its cache) and the whole conversation's inputs for turn 2."""
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    turn2 = torch.randint(10, 40, (1, 5), generator=torch.Generator().manual_seed(3))
    conv = torch.cat([out.sequences, turn2], 1)
    extra = conv.shape[1] - inp["input_ids"].shape[1]
    full = dict(inp, input_ids=conv, attention_mask=torch.ones_like(conv))
    if "mm_token_type_ids" in inp:
        full["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], torch.zeros(1, extra, dtype=torch.long)], 1)
    reuse = {k: v for k, v in full.items() if not k.startswith("pixel_values")}
    return cache, full, reuse, turn2


def test_second_turn_reusing_the_cache(patched):
    name, kind, model, inp, handle = patched
    cache, full, reuse, turn2 = _turns(model, inp)
    first = handle.last_stats.kept_indices
    with torch.no_grad():
        got = model.generate(**reuse, **{CACHE: cache}, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    if kind == "vision":   # the selection does not depend on the text: same as a fresh call
        assert torch.equal(got[:, -NEW:], gen(model, full, do_sample=False)[:, -NEW:])
        return
    # text-conditioned inner stage: reuse keeps the first turn's kept set (documented); it equals
    # feeding the cache exactly the tokens it lacks by hand (turn 1's last token, then turn 2)
    cache2, _, _, _ = _turns(model, inp)
    assert all(torch.equal(a, b) for a, b in zip(handle.last_stats.kept_indices[0], first[0]))
    n = turn2.shape[1] + 1
    manual = {k: (v[:, -n:] if k in ("input_ids", "mm_token_type_ids") else v) for k, v in reuse.items()}
    with torch.no_grad():
        ref = model.generate(**manual, **{CACHE: cache2}, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(got[:, -NEW:], ref[:, -NEW:])


@pytest.mark.parametrize("mode", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)], ids=["beam3", "nrs2"])
def test_beam_search_equals_unpatched_fed_the_kept_tokens(patched, mode):
    name, kind, model, inp, handle = patched
    got = gen(model, inp, do_sample=False, **mode)
    assert got.shape[0] == mode.get("num_return_sequences", 1)
    if kind != "vision" or name == "qwen3_vl":
        # inner stages have no "fed the kept tokens" input to give generate; Qwen3's DeepStack
        # adds visual features inside the LLM that an inputs_embeds call cannot carry
        assert torch.equal(gen(model, inp, do_sample=False), gen(model, inp, do_sample=False))
        return
    cap = _Capture(model)
    gen(model, inp, do_sample=False)
    cap.h.remove()
    fed = cap.seen[0]
    handle.remove()
    e = fed["inputs_embeds"]
    with torch.no_grad():
        ideal = model.generate(inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long),
                               position_ids=fed["position_ids"], max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, **mode)
    assert torch.equal(got[:, -NEW:], ideal[:, -NEW:])
