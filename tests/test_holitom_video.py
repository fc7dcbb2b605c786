"""HoliTom on video (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and stacking an inner-LLM stage after an
outer one. References: the outer stage from independently recorded attention and raster features
(``test_qwen.recorded_vision``) through the unit-tested :func:`holitom_in_place`; the inner stage by
running the unpatched decoder layer by layer on the pruned inputs, slicing at layer K by hand."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_batch_equals_singles, hook_snapshot
from test_qwen import hand_fed, recorded_vision, row_map, spans, visual_mask

import tokenprune
from tokenprune.eval.tiny import QWEN_KINDS, build_qwen, qwen_batch, qwen_inputs
from tokenprune.strategies.holitom import holitom_in_place, merge_into_kept
from tokenprune.testing import cache_kwarg, output_cache

VIDEO = (4, 8, 8)          # 4 temporal groups of 4 x 4 tokens = 64 tokens
KEEP = 0.25                # -> 16 video tokens


@pytest.fixture(scope="module", params=QWEN_KINDS)
def base(request):
    model = build_qwen(request.param)
    # static background: frames share most of their content, so segments and static merging occur
    return request.param, model


@pytest.fixture()
def qm(base):
    kind, model = base
    return kind, copy.deepcopy(model)


def video_inputs(kind, seed=0, images=(), videos=(VIDEO,)):
    inp = qwen_inputs(kind, images=list(images), videos=list(videos), seed=seed)
    # make frames nearly static: every temporal group repeats the first one plus small noise,
    # except a moving block, so that HoliTom finds static positions and windows
    px, grid = inp["pixel_values_videos"], inp["video_grid_thw"]
    g = torch.Generator().manual_seed(seed + 7)
    off = 0
    for t, h, w in grid.tolist():
        n = h * w
        first = px[off:off + n].clone()
        for j in range(1, t):
            px[off + j * n:off + (j + 1) * n] = first + 0.05 * torch.randn(first.shape, generator=g)
            px[off + j * n + 4 * j:off + j * n + 4 * j + 8] = torch.randn(8, first.shape[1], generator=g)
        off += t * n
    return inp


def expected_outer(handle, model, inp):
    """(kept indices, merged features) per span from the reference scores and features."""
    scores, feats = recorded_vision(model, inp)
    layer = handle.vspec.requests(handle.vconfig, handle.family.vision_info)[0].layer
    out = []
    sizes = [int(g.prod(-1).sum()) for _, _, g in feats]
    start = 0
    for (pooled, merged, grid), size in zip(feats, sizes):
        v = scores[layer]["mean"][start:start + size]
        start += size
        tok = v.reshape(-1, 4).mean(1)[row_map(pooled, merged)]
        off = 0
        is_video = grid is inp.get("video_grid_thw")
        for t, h, w in grid.tolist():
            n = t * (h // 2) * (w // 2)
            if not is_video:
                out.append((torch.arange(n), None))
            else:
                f = pooled[off:off + n].reshape(t, n // t, -1)
                idx, fe, _ = holitom_in_place(f, tok[off:off + n].reshape(t, n // t), handle.vconfig.tokens_for(n),
                                              handle.vconfig.threshold(), handle.vconfig.beta, handle.vconfig.k)
                out.append((idx, fe))
            off += n
    return out


def test_outer_stage_finds_static_windows_on_this_input(base):
    """Sanity of the fixture: the reference segmentation has a window longer than one group."""
    from tokenprune.strategies.holitom import frame_similarity, segment_windows

    kind, model = base
    inp = video_inputs(kind)
    _, feats = recorded_vision(model, inp)
    pooled = feats[0][0]
    segs, removable = segment_windows(frame_similarity(pooled.reshape(4, 16, -1)), 0.8)
    assert removable > 0 and any(e > s for s, e in segs)


def test_keep_one_is_bit_identical(qm):
    kind, model = qm
    inp = video_inputs(kind, images=[(8, 8)])
    with torch.no_grad():
        ref = model(**inp).logits
        ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    for params in ({"inner_merge": False}, {"inner_keep": 1.0}):
        with tokenprune.apply(model, "holitom", keep=1.0, **params):
            with torch.no_grad():
                assert torch.equal(model(**inp).logits, ref)
                assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)


def test_remove_restores_exactly(qm):
    kind, model = qm
    inp = video_inputs(kind)
    with torch.no_grad():
        ref = model(**inp).logits
        model.generate(**inp, max_new_tokens=2, do_sample=False)
    before = hook_snapshot(model)
    h = tokenprune.apply(model, "holitom", keep=KEEP)
    with torch.no_grad():
        model.generate(**inp, max_new_tokens=2, do_sample=False)
    h.remove()
    assert hook_snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, ref)


def test_outer_stage_equals_reference_and_hand_fed(qm):
    """w/o M: the kept tokens and merged static features are HoliTom's on the reference scores;
    logits equal the unpatched model fed those tokens (merged values in place) by hand."""
    kind, model = qm
    inp = video_inputs(kind, images=[(8, 8)])
    clean = copy.deepcopy(model)
    h = tokenprune.apply(model, "holitom", keep=KEEP, inner_merge=False)
    with torch.no_grad():
        out = model(**inp).logits
    st = h.last_stats
    exp = expected_outer(h, clean, inp)
    assert st.visual_tokens_in == [16 + 64] and st.visual_tokens_kept == [16 + 16]   # the image passes whole
    for got, (idx, _) in zip(st.kept_indices[0], exp):
        assert torch.equal(got, idx)
    groups = st.merge_groups[0][1]
    assert groups is not None and int(groups.max()) == 15 and bool((groups[exp[1][0]] == torch.arange(16)).all())
    ref = hand_fed(clean, inp, [e[0] for e in exp], [e[1] for e in exp])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def layerwise(model, lm_kwargs, keep_k, layer, merge=None):
    """Unpatched decoder run by hand on the LLM inputs the outer stage produced (one row): layers
    < K see every token, layers >= K only ``keep_k``; Qwen3's DeepStack rows are added after the
    first layers at the visual positions, as the model does."""
    lm = model.model.language_model
    h = lm_kwargs["inputs_embeds"]
    pos = lm_kwargs["position_ids"]
    text_pos = pos[0] if pos.shape[0] == 4 else None
    mrope = pos[1:] if pos.shape[0] == 4 else pos
    pe = lm.rotary_emb(h, mrope)
    vpm, deep = lm_kwargs.get("visual_pos_masks"), lm_kwargs.get("deepstack_visual_embeds")
    idx = torch.nonzero(keep_k).flatten()
    for i, dec in enumerate(lm.layers):
        if i == layer:
            if merge is not None:
                h = merge(h)
            h, pe = h[:, idx], (pe[0][:, idx], pe[1][:, idx])
            text_pos = None if text_pos is None else text_pos[:, idx]
        out = dec(h, attention_mask=None, position_ids=text_pos, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
        if deep is not None and i < len(deep):
            h = h.clone()
            h[vpm] = h[vpm] + deep[i]
    return model.lm_head(lm.norm(h))


def captured_lm_inputs(model, inp):
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(k), with_kwargs=True)   # registered last: sees the pruned inputs
    with torch.no_grad():
        out = model(**inp).logits
    hook.remove()
    return out, seen


@pytest.mark.parametrize("strategy,params", [("holitom", {}), ("hiprune", {"inner": ("fastv", {"keep": 0.5})})],
                         ids=["holitom", "hiprune+fastv"])
def test_inner_stage_after_outer_equals_layerwise_reference(qm, strategy, params):
    kind, model = qm
    inp = video_inputs(kind, images=[(8, 8)])
    clean = copy.deepcopy(model)
    h = tokenprune.apply(model, strategy, keep=KEEP, **params)
    out, lm_in = captured_lm_inputs(model, inp)
    st = h.last_stats
    K = h.llm_layer
    assert K >= h.family.min_inner_layer
    # the inner stage's kept set, in the outer-pruned sequence
    ids_kept = lm_in["inputs_embeds"].shape[1]
    vmask = visual_mask(inp["input_ids"])[0]
    keep_outer = ~vmask.clone()
    for sp, k in zip(spans(inp["input_ids"][0], inp), st.kept_indices[0]):
        keep_outer[sp[k]] = True
    pos_of = torch.cumsum(keep_outer.long(), 0) - 1          # original column -> pruned column
    keep_k = torch.ones(ids_kept, dtype=torch.bool)
    spans_k = []
    for sp, k, inner in zip(spans(inp["input_ids"][0], inp), st.kept_indices[0], st.inner_kept_indices[0]):
        cols = pos_of[sp[k]]
        spans_k.append((cols, inner))
        flags = torch.zeros(cols.numel(), dtype=torch.bool)
        flags[inner] = True
        keep_k[cols] = flags
    video_only = strategy == "holitom"
    n_img, n_vid = st.kept_indices[0][0].numel(), st.kept_indices[0][1].numel()
    assert st.inner_tokens_kept == [(n_img if video_only else round(0.5 * n_img)) + round(0.5 * n_vid)]
    merge = None
    if h.lspec.merge_llm is not None:
        def merge(hid):
            hid = hid.clone()
            for (cols, inner), sp_is_video in zip(spans_k, (False, True)):
                if video_only and not sp_is_video:
                    continue
                hid[0, cols[inner]] = merge_into_kept(hid[0, cols], inner, h.lconfig.weighting)
            return hid
    ref = layerwise(clean, lm_in, keep_k, K, merge)
    torch.testing.assert_close(out[:, -1], ref[:, -1], atol=3e-5, rtol=1e-5)
    # and cached generation follows the same prefill
    with torch.no_grad():
        g = model.generate(**inp, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(g.scores[0][0], ref[0, -1], atol=3e-5, rtol=1e-5)


def test_images_pass_through_unchanged(qm):
    kind, model = qm
    inp = qwen_inputs(kind, images=[(8, 12), (8, 8)])
    with torch.no_grad():
        ref = model(**inp).logits
    with tokenprune.apply(model, "holitom", keep=KEEP) as h:
        with torch.no_grad():
            assert torch.equal(model(**inp).logits, ref)
        assert h.last_stats.visual_tokens_kept == h.last_stats.visual_tokens_in == [24 + 16]


@pytest.mark.parametrize("params", [{"inner_merge": False}, {}], ids=["w/o M", "with M"])
def test_mixed_batch_image_and_video_equals_one_by_one(qm, params):
    kind, model = qm
    rows = [qwen_inputs(kind, images=[(8, 12)], seed=1), video_inputs(kind, seed=2, images=[(8, 8)])]
    inp = qwen_batch(kind, rows)
    h = tokenprune.apply(model, "holitom", keep=KEEP, **params)
    st_b = assert_batch_equals_singles(model, h, inp, rows)
    assert st_b.visual_tokens_kept == [24, 16 + 16]


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.6, 0.9])
def test_budget_is_exact_and_deterministic(base, keep):
    kind, model = base
    inp = video_inputs(kind)
    kept = []
    for _ in range(2):
        m = copy.deepcopy(model)
        with tokenprune.apply(m, "holitom", keep=keep, inner_merge=False) as h:
            with torch.no_grad():
                m(**inp)
            kept.append(h.last_stats.kept_indices[0][0])
            assert h.last_stats.visual_tokens_kept == [round(keep * 64)]
    assert torch.equal(kept[0], kept[1])


def test_holitom_needs_a_video_family():
    from tokenprune.eval.tiny import build_llava

    with pytest.raises(tokenprune.IncompatibleStrategyError, match="video"):
        tokenprune.apply(build_llava(), "holitom", keep=KEEP)


def test_stacking_errors():
    model = build_qwen("qwen2_vl")
    with pytest.raises(tokenprune.ConfigError, match="inner must be"):
        tokenprune.apply(model, "hiprune", keep=KEEP, inner="fastv")
    with pytest.raises(tokenprune.ConfigError, match="acts before it"):
        tokenprune.apply(model, "hiprune", keep=KEEP, inner=("pool", {"keep": 0.5}))
    with pytest.raises(tokenprune.ConfigError, match="already acts inside the LLM"):
        tokenprune.apply(model, "fastv", keep=KEEP, inner=("fastv", {"keep": 0.5}))
    assert tokenprune.get_handle(model) is None


def test_stacking_on_llava_equals_layerwise_reference():
    """The general stacking path on LLaVA-1.5 (1-D positions): hiprune before the LLM, then
    FastV at layer K on the tokens hiprune kept."""
    from conftest import N_TOK, single

    from tokenprune.eval.tiny import build_llava

    model = build_llava()
    clean = copy.deepcopy(model)
    inp = single(2)
    h = tokenprune.apply(model, "hiprune", budget=20, inner=("fastv", {"budget": 8, "layer": 1}))
    out, lm_in = captured_lm_inputs(model, inp)
    st = h.last_stats
    assert st.visual_tokens_kept == [40] and st.inner_tokens_kept == [16]
    ids = inp["input_ids"][0]
    keep_outer = ids != 4
    runs = torch.nonzero(ids == 4).flatten().reshape(-1, N_TOK)
    for run, k in zip(runs, st.kept_indices[0]):
        keep_outer[run[k]] = True
    pos_of = torch.cumsum(keep_outer.long(), 0) - 1
    keep_k = torch.ones(int(keep_outer.sum()), dtype=torch.bool)
    for run, k, inner in zip(runs, st.kept_indices[0], st.inner_kept_indices[0]):
        cols = pos_of[run[k]]
        flags = torch.zeros(cols.numel(), dtype=torch.bool)
        flags[inner] = True
        keep_k[cols] = flags
    ref = layerwise(clean, lm_in, keep_k, 1)
    torch.testing.assert_close(out[:, -1], ref[:, -1], atol=3e-5, rtol=1e-5)
    with torch.no_grad():
        g = model.generate(**inp, max_new_tokens=4, do_sample=False)
        seq, cache = [], None
        o = model(**inp, use_cache=True)
        cache, tok = output_cache(o), o.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(4):
            seq.append(tok)
            o = model(input_ids=tok, **{cache_kwarg(): cache}, use_cache=True)
            cache, tok = output_cache(o), o.logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(torch.cat(seq, 1), g[:, -4:])


def test_outer_stage_benchmark_smoke(tmp_path):
    """The HoliTom outer-stage benchmark at a tiny size: every column is produced and finite."""
    import json
    import math

    from tokenprune.eval.bench.holitom import main

    main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "holitom_outer_tiny.json").read_text())
    assert res["kept"] == round(0.1 * 32 * 196)
    for key in ("vision_ms", "vision_patched_ms", "capture_and_select_ms", "outer_ms", "outer_share"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert (tmp_path / "holitom_outer_tiny.md").stat().st_size > 0
