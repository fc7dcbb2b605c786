"""LLaVA-1.5's own references (the invariants every family shares run in the kit, test_kit.py):
selections recomputed from eager vision attention, the hand-fed model with both position rules, the
inner stage recomputed by hand over a whole generation, exact budgets of every size, parameter
variants, eager attention, threads."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import N_TOK, batch, eager_vision, expected_selections, hook_snapshot, manual_logits, pixels, reference_embeds, single  # noqa: F401

import tokenprune
from tokenprune.strategies.base import Selection
from tokenprune.testing import eager_signals, reference_tokens

STRATEGIES = [s for s in tokenprune.list_strategies()   # LLaVA-1.5 has no video: not HoliTom's outer stage
              if "video" not in tokenprune.registry.get_strategy(s).needs]
INNER = [s for s in STRATEGIES if tokenprune.registry.get_strategy(s).stage == "llm"]
EXTRA = {"fopru": [{"mode": "rank"}, {"mode": "row"}], "fastv": [{}, {"layer": 1}],
         "holitom_inner": [{}, {"layer": 1, "weighting": "mean"}], "sparsevlm": [{}, {"recycle": False}],
         "pdrop": [{}, {"layers": "1,2"}]}


def skip_unreproduced_merges(h):
    """A stage merged by the strategy's own rule (not ``merge_llm``, which ``inner_merge`` rebuilds):
    the by-hand reference cannot rebuild its states (SparseVLM's recycling has its own by-hand test)."""
    if h.spec.merge_llm is None and any(s.merged for s in h.last_stats.stages):
        pytest.skip("the stage merged hidden states by the strategy's own rule: see its own by-hand test")
CASES = [(s, p) for s in STRATEGIES for p in EXTRA.get(s, [{}])]
IDS = [s + ("-" + "-".join(map(str, p.values())) if p else "") for s, p in CASES]
BUDGET = 20


def keep_mask(input_ids_row: torch.Tensor, kept: list[torch.Tensor], image_token_id: int = 4) -> torch.Tensor:
    vis = input_ids_row == image_token_id
    keep = ~vis.clone()
    keep[vis] = torch.cat([torch.zeros(N_TOK, dtype=torch.bool).index_fill_(0, k, True) for k in kept])
    return keep


def inner_merge(handle, ids, kept):
    """Reference of HoliTom's "M" for one row: each image's dropped tokens merged into its kept ones
    (by the unit-tested ``merge_into_kept``) in the hidden states entering layer K; None otherwise."""
    if handle.spec.merge_llm is None:
        return None
    from tokenprune.strategies.holitom import merge_into_kept

    spans = torch.nonzero(ids[0] == 4).flatten().reshape(-1, N_TOK)

    def merge(hid):
        hid = hid.clone()
        for got, span in zip(kept, spans):
            hid[0, span[got]] = merge_into_kept(hid[0, span], got, handle.config.weighting)
        return hid
    return merge


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_pruned_equals_hand_fed_kept_tokens(model, name, params, positions):
    if name in INNER and positions == "compact":
        pytest.skip("inner-LLM strategies keep original positions inside the LLM by definition")
    inp = single(2)
    clean = copy.deepcopy(model)
    h = tokenprune.apply(model, name, budget=BUDGET, positions=positions, **params)
    with torch.no_grad():
        out = model(**inp).logits
    st = h.last_stats
    ids = inp["input_ids"]
    keep = keep_mask(ids[0], st.kept_indices[0])
    assert [k.numel() for k in st.kept_indices[0]] == [BUDGET, BUDGET]
    if h.spec.stage == "vision":
        sels, feats = expected_selections(h, clean, inp["pixel_values"], ids)
        for got, exp in zip(st.kept_indices[0], sels):   # same token set as the method on eager weights
            assert torch.equal(got, exp.indices)
        emb = reference_embeds(clean, ids, inp["pixel_values"], sels, feats)
        ref = manual_logits(clean, ids, emb, keep, positions=positions)
    else:
        skip_unreproduced_merges(h)
        emb = reference_embeds(clean, ids, inp["pixel_values"])
        signals = h.lspec.llm_signals
        sig = eager_signals(clean, inp, h.llm_layer - 1, signals)
        vis = torch.nonzero(ids[0] == 4).flatten().reshape(-1, N_TOK)
        for got, span in zip(st.kept_indices[0], vis):   # the strategy's own rule on eager signals
            text = torch.nonzero((torch.arange(ids.shape[1]) > span.max()) & (ids[0] != 4)).flatten()
            chosen = h.lspec.select_llm(h.config, reference_tokens(sig, signals, span, torch.arange(N_TOK), text), BUDGET)
            chosen = chosen.indices if isinstance(chosen, Selection) else chosen
            assert torch.equal(got, torch.sort(chosen).values)
        ref = manual_logits(clean, ids, emb, keep, merge=inner_merge(h, ids, st.kept_indices[0]),
                            cuts=[(s.layer, keep_mask(ids[0], s.kept_indices[0])) for s in st.stages])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,params", [c for c in CASES if c[0] in INNER], ids=[i for c, i in zip(CASES, IDS) if c[0] in INNER])
def test_cached_generate_equals_a_recomputation_by_hand(model, name, params):
    """Inner stages: every generated token's logits == the unpatched layers fed the prompt with the
    prefill's kept set from layer K on and the generated tokens (recomputed by hand)."""
    inp = single(1, seed=3)
    clean = copy.deepcopy(model)
    h = tokenprune.apply(model, name, budget=BUDGET, **params)
    with torch.no_grad():
        g = model.generate(**inp, max_new_tokens=6, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
    skip_unreproduced_merges(h)
    kept = h.last_stats.kept_indices[0]
    ids = inp["input_ids"]
    L = ids.shape[1]
    seq = g.sequences
    emb_prompt = reference_embeds(clean, ids, inp["pixel_values"])
    emb = torch.cat([emb_prompt, clean.model.get_input_embeddings()(seq[:, L:])], 1)
    tail = torch.ones(seq.shape[1] - L, dtype=torch.bool)
    keep = torch.cat([keep_mask(ids[0], kept), tail])
    cuts = [(s.layer, torch.cat([keep_mask(ids[0], s.kept_indices[0]), tail])) for s in h.last_stats.stages]
    ref = manual_logits(clean, seq, emb, keep, merge=inner_merge(h, ids, kept), cuts=cuts)
    n_text_after = int(keep[L - 1:].sum())  # positions of the prompt's last token onwards
    ref_steps = ref[0, -n_text_after:][: len(g.scores)]
    for t, s in enumerate(g.scores):
        torch.testing.assert_close(s[0], ref_steps[t], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
@pytest.mark.parametrize("budget", [1, 7, 33, N_TOK])
def test_exact_budget_reaches_the_llm(model, name, params, budget):
    inp = single(2)
    h = tokenprune.apply(model, name, budget=budget, **params)
    lengths = []
    layer = model.model.language_model.layers[h.llm_layer or 0]
    hook = layer.register_forward_pre_hook(lambda m, a, k: lengths.append(a[0].shape[1]), with_kwargs=True)
    with torch.no_grad():
        model(**inp)
    hook.remove()
    n_text = int((inp["input_ids"] != 4).sum())
    assert lengths == [n_text + 2 * budget]
    assert h.last_stats.visual_tokens_kept == [2 * budget]
    for k in h.last_stats.kept_indices[0]:
        assert k.numel() == budget and torch.equal(k, torch.sort(torch.unique(k)).values)


@pytest.mark.parametrize("name", ["hiprune", "fastv"])
def test_threads_do_not_share_call_state(model, name):
    inputs = [single(1, seed=s) for s in range(4)]
    h = tokenprune.apply(model, name, budget=BUDGET)
    expected = []
    for inp in inputs:
        with torch.no_grad():
            expected.append(model.generate(**inp, max_new_tokens=4, do_sample=False))
    results: dict[int, torch.Tensor] = {}

    def run(i):
        for _ in range(3):
            with torch.no_grad():
                results[i] = model.generate(**inputs[i], max_new_tokens=4, do_sample=False)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i in range(4):
        assert torch.equal(results[i], expected[i])
    h.remove()


def test_cls_kept_with_full_select_strategy():
    from tokenprune.eval.tiny import build_llava

    model = build_llava(select_strategy="full")
    ids = torch.cat([torch.tensor([[1, 20]]), torch.full((1, N_TOK + 1), 4), torch.tensor([[30, 40]])], 1)
    inp = {"input_ids": ids, "pixel_values": pixels(1)}
    with tokenprune.apply(model, "hiprune", budget=10) as h:
        with torch.no_grad():
            model(**inp)
        kept = h.last_stats.kept_indices[0][0]
        assert kept.numel() == 10 and kept[0] == 0     # the CLS placeholder is always kept


def test_many_calls_in_a_row_keep_finding_their_encodings(model):
    """More calls than the pending-encoding bound, alternating forward and generate."""
    inp = single(1)
    with tokenprune.apply(model, "hiprune", budget=BUDGET) as h:
        for _ in range(12):
            with torch.no_grad():
                model(**inp)
                model.generate(**inp, max_new_tokens=1, do_sample=False)
            assert h.last_stats.visual_tokens_kept == [BUDGET]


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_eager_attention_batch_equals_one_by_one(name, params):
    """Under eager attention (float 4D masks instead of SDPA's) the same invariants hold."""
    from tokenprune.eval.tiny import build_llava

    model = build_llava(attn_implementation="eager")
    inp, singles = batch([(1, 1), (2, 2)])
    # a padded row numbered as generate numbers it (DART's rotated-key norms see absolute positions)
    pos = (inp["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with tokenprune.apply(model, name, budget=BUDGET, **params):
        with torch.no_grad():
            out = model(**inp, position_ids=pos).logits
            gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
            for r, s in enumerate(singles):
                torch.testing.assert_close(out[r, -1], model(**s).logits[0, -1], atol=5e-5, rtol=1e-4)
                assert torch.equal(gen[r, -4:], model.generate(**s, max_new_tokens=4, do_sample=False)[0, -4:])
    assert model.config.text_config._attn_implementation == "eager"
