"""The conformance suite over the Qwen2-VL, Qwen2.5-VL and Qwen3-VL families (images and video).

References are built independently of the engine: attention weights come from a registered
attention function that records what the model's own kernel inputs give (after rotary, per
segment / window), the raster order of Qwen2.5-VL's window-permuted merger rows is recovered by
matching rows, and the "hand-fed" reference slices the unpatched language model's inputs itself.
"""
from __future__ import annotations

import copy

import pytest
import torch

import tokenprune
from tokenprune.eval.tiny import QWEN_IDS, QWEN_KINDS, build_qwen, qwen_batch, qwen_inputs
from tokenprune.testing import cache_kwarg, output_cache

# image-pruning strategies (the video-only ones, HoliTom and EVS, pass images whole: test_holitom_video.py,
# test_strategy_evs.py)
STRATEGIES = [s for s in tokenprune.list_strategies() if tokenprune.registry.get_strategy(s).images == "select"]
INNER = [s for s in STRATEGIES if tokenprune.registry.get_strategy(s).stage == "llm"]
VISION = [s for s in STRATEGIES if s not in INNER]
# one image of 8x12 patches (24 tokens), one video of 2 temporal patches x 8x8 (2 x 16 tokens)
IMAGES, VIDEOS = [(8, 12)], [(2, 8, 8)]
KEEP = 0.25   # image 24 -> 6, video 32 -> 8 (4 per temporal group)


@pytest.fixture(scope="module", params=QWEN_KINDS)
def base(request):
    return request.param, build_qwen(request.param)


@pytest.fixture()
def qm(base):
    kind, model = base
    return kind, copy.deepcopy(model)


def inputs(kind, seed=0, images=IMAGES, videos=VIDEOS, dtype=torch.float32):
    return qwen_inputs(kind, images=images, videos=videos, seed=seed, dtype=dtype)


def visual_mask(ids):
    return (ids == QWEN_IDS["image"]) | (ids == QWEN_IDS["video"])


def spans(ids_row, inp):
    """Placeholder columns of each image then each video of one row (encoder order)."""
    out = []
    for m, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        cols = torch.nonzero(ids_row == QWEN_IDS[m]).flatten()
        start = 0
        for t, h, w in inp.get(key, torch.zeros(0, 3, dtype=torch.long)).tolist():
            n = t * h * w // 4
            out.append(cols[start:start + n])
            start += n
    return out


# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def recorded_vision(model, inp):
    """Per vision block, attention received per patch and head-mean keys, from the model's own
    attention-kernel inputs; plus the raster features of every image and video (merger output
    after the model's own un-permutation), and the merger-row -> raster map."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    m = copy.deepcopy(model)
    layer_of = {id(b.attn): i for i, b in enumerate(m.model.visual.blocks)}
    rec: dict[int, dict[str, list]] = {}

    def capture(module, q, k, v, attention_mask, **kw):
        if id(module) in layer_of:
            p = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * kw["scaling"], dim=-1)
            r = rec.setdefault(layer_of[id(module)], {"mean": [], "keys": []})
            r["mean"].append(p[0].mean(0).mean(0))
            r["keys"].append(k[0].float().mean(0))
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kw)

    AttentionInterface.register("sdpa_refcapture", capture)
    m.set_attn_implementation({"vision_config": "sdpa_refcapture"})
    merger_rows = {}
    h = m.model.visual.merger.register_forward_hook(lambda mod, a, out: merger_rows.setdefault(len(merger_rows), out))
    feats = []
    for key, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if key in inp:
            out = m.model.visual(inp[key], grid_thw=inp[grid])
            feats.append((out.pooler_output, merger_rows[len(merger_rows) - 1], inp[grid]))
    h.remove()
    scores = {layer: {kind: torch.cat(v) for kind, v in r.items()} for layer, r in rec.items()}
    return scores, feats


def row_map(pooled, merged):
    """raster index r -> merger row, found by matching rows (independent of window_index)."""
    d = torch.cdist(pooled.float(), merged.float())
    return d.argmin(1)


def expected(handle, model, inp):
    """Per image / video: (kept indices, merged features or None) from the reference scores."""
    from tokenprune.sequence import split_budget
    from tokenprune.strategies.base import VisualTokens

    scores, feats = recorded_vision(model, inp)
    # scores were recorded for image pass then video pass, in block order; split per pass
    sizes = [int(g.prod(-1).sum()) for _, _, g in feats]
    offsets = [0, sizes[0]] if len(sizes) == 2 else [0]
    out = []
    texts = iter([])
    if handle.spec.text:     # CDPruner: the LLM-input embeddings of the text after each run (row 0)
        ids = inp["input_ids"][0]
        visual = (ids == QWEN_IDS["image"]) | (ids == QWEN_IDS["video"])
        emb = model.model.get_input_embeddings()(ids)
        # one image and one video here; a video's run ends at its last frame (Qwen3-VL puts
        # timestamps between its frames)
        ends = [int(torch.nonzero(ids == QWEN_IDS[m]).max()) for m in ("image", "video") if bool((ids == QWEN_IDS[m]).any())]
        texts = iter([emb[(torch.arange(ids.numel()) > e) & ~visual] for e in ends])
    for p, (pooled, merged, grid) in enumerate(feats):
        rmap = row_map(pooled, merged)
        sl = slice(offsets[p], offsets[p] + sizes[p])
        tok = {}
        for r in handle.requests:
            v = scores[r.layer][r.kind]
            n_total = sum(sizes)
            assert v.shape[0] == n_total, (v.shape, n_total)
            v = v[sl]
            v = v.reshape(v.shape[0] // 4, 4, *v.shape[1:]).mean(1)   # merger-row order
            tok[(r.layer, r.kind)] = v[rmap]                          # raster order
        off = 0
        for t, h, w in grid.tolist():
            text = next(texts, None)
            gh, gw = h // 2, w // 2
            total = handle.config.tokens_for(t * gh * gw)
            budgets = split_budget(total, [gh * gw] * t)
            idx, merged_feats = [], []
            for j in range(t):
                rows = torch.arange(off + j * gh * gw, off + (j + 1) * gh * gw)
                vt = VisualTokens(grid=(gh, gw), features=pooled[rows],
                                  scores={k: v[rows] for k, v in tok.items()}, text=text)
                sel = handle.spec.select(handle.config, vt, budgets[j], handle.family.vision_info)
                idx.append(sel.indices + j * gh * gw)
                merged_feats.append(sel.features)
            off += t * gh * gw
            out.append((torch.cat(idx), None if merged_feats[0] is None else torch.cat(merged_feats)))
    return out


@torch.no_grad()
def hand_fed(clean, inp, keeps, feats=None):
    """Logits of the unpatched model whose language model is fed only the kept tokens, sliced
    here by hand: embeds, 3-D positions, mask (and Qwen3's DeepStack rows); ``feats``: per span
    (indices, features) that replace the embeddings of merged tokens."""
    ids = inp["input_ids"]

    def pre(mod, args, kw):
        vis = visual_mask(ids)
        keep = ~vis
        emb = kw["inputs_embeds"].clone()
        for sp, k, f in zip(spans(ids[0], inp), keeps, feats or [None] * len(keeps)):
            flags = torch.zeros(sp.numel(), dtype=torch.bool)
            flags[k] = True
            keep[0, sp] = flags
            if f is not None:
                emb[0, sp[k]] = f.to(emb.dtype)
        idx = torch.nonzero(keep[0]).flatten()
        new = dict(kw)
        new["inputs_embeds"] = emb[:, idx]
        new["position_ids"] = kw["position_ids"][..., idx]
        new["attention_mask"] = kw["attention_mask"][:, idx]
        if kw.get("visual_pos_masks") is not None:
            rows = keep[kw["visual_pos_masks"]]
            new["visual_pos_masks"] = kw["visual_pos_masks"][:, idx]
            new["deepstack_visual_embeds"] = [e[rows] for e in kw["deepstack_visual_embeds"]]
        return args, new
    h = clean.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return clean(**inp).logits
    finally:
        h.remove()


# ----------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VISION)
def test_pruned_equals_hand_fed_kept_tokens(qm, name):
    kind, model = qm
    inp = inputs(kind)
    clean = copy.deepcopy(model)
    h = tokenprune.apply(model, name, keep=KEEP)
    with torch.no_grad():
        out = model(**inp).logits
    kept = h.last_stats.kept_indices[0]
    exp = expected(h, clean, inp)
    assert [k.numel() for k in kept] == [6, 8]
    for got, (idx, _) in zip(kept, exp):          # the same tokens as the method on reference scores
        assert torch.equal(got, torch.sort(idx).values)
    ref = hand_fed(clean, inp, [e[0] for e in exp], [None if e[1] is None else (e[1]) for e in exp])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", STRATEGIES)
def test_manual_decode_loop_equals_generate(qm, name):
    """Decode steps without position_ids: the model derives them from rope_deltas and the (pruned)
    cache length; the engine keeps them in the prefill's numbering."""
    kind, model = qm
    inp = inputs(kind, seed=4)
    tokenprune.apply(model, name, keep=KEEP)
    with torch.no_grad():
        g = model.generate(**inp, max_new_tokens=4, do_sample=False)
        out = model(**inp, use_cache=True)
        cache, tok, seq = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True), []
        for _ in range(4):
            seq.append(tok)
            out = model(input_ids=tok, **{cache_kwarg(): cache}, use_cache=True)
            cache, tok = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(torch.cat(seq, 1), g[:, -4:])


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("budget", [1, 5, 16])
def test_exact_budget_reaches_the_llm(qm, name, budget):
    kind, model = qm
    inp = inputs(kind)
    h = tokenprune.apply(model, name, budget=budget)
    lengths = []
    layer = model.model.language_model.layers[h.llm_layer or 0]
    hook = layer.register_forward_pre_hook(lambda m, a, k: lengths.append((a[0] if a else k["hidden_states"]).shape[1]),
                                           with_kwargs=True)
    with torch.no_grad():
        model(**inp)
    hook.remove()
    n_text = int((~visual_mask(inp["input_ids"])).sum())
    assert lengths == [n_text + 2 * budget]
    assert h.last_stats.visual_tokens_kept == [2 * budget]
    # vision-stage: the video's budget is split over its temporal groups as evenly as possible
    # (inner-LLM strategies rank the whole video's tokens at once)
    video = h.last_stats.kept_indices[0][1]
    assert name in INNER or abs(int((video < 16).sum()) - int((video >= 16).sum())) <= 1


@pytest.mark.parametrize("name", VISION)
def test_kept_tokens_keep_their_unpruned_positions(qm, name):
    kind, model = qm
    inp = inputs(kind)
    seen = []

    def watch():  # registered after the engine's hook, so it sees what the LLM receives
        return model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["position_ids"].clone()), with_kwargs=True)
    with torch.no_grad():
        hook = watch()
        model(**inp)
        hook.remove()
        h = tokenprune.apply(model, name, keep=KEEP)
        hook = watch()
        model(**inp)
        hook.remove()
    full, pruned = seen
    assert pruned.shape[-1] == full.shape[-1] - (24 + 32) + 14
    ids = inp["input_ids"][0]
    keep = ~visual_mask(inp["input_ids"])[0]
    for sp, k in zip(spans(ids, inp), h.last_stats.kept_indices[0]):
        keep[sp[k]] = True
    idx = torch.nonzero(keep).flatten()
    assert torch.equal(pruned, full[..., idx])


@pytest.mark.parametrize("name", ["hiprune", "fastv"])
def test_eager_llm_attention_batch_equals_one_by_one(base, name):
    kind, model = base
    model = copy.deepcopy(model)
    model.set_attn_implementation({"text_config": "eager"})
    rows = [inputs(kind, seed=1, images=[(8, 12)], videos=[]), inputs(kind, seed=2, images=[(8, 8)])]
    inp = qwen_batch(kind, rows)
    with tokenprune.apply(model, name, keep=KEEP):
        with torch.no_grad():
            out = model(**inp).logits
            for r, s in enumerate(rows):
                torch.testing.assert_close(out[r, -1], model(**s).logits[0, -1], atol=5e-5, rtol=1e-4)
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_budget_larger_than_an_image_is_a_clear_error(qm):
    kind, model = qm
    inp = inputs(kind, videos=[])
    with torch.no_grad():
        ref = model(**inp).logits
    with tokenprune.apply(model, "hiprune", budget=25):   # the image has 24 tokens
        with pytest.raises(tokenprune.ConfigError, match="more than the 24 visual tokens"):
            with torch.no_grad():
                model(**inp)
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, ref)


@pytest.mark.parametrize("name", ["hiprune", "pool", "fastv"])
def test_video_of_one_temporal_patch(qm, name):
    """A one-frame video (one temporal patch after the processor's padding) is one unit."""
    kind, model = qm
    inp = inputs(kind, images=[], videos=[(1, 8, 8)])
    with tokenprune.apply(model, name, keep=KEEP) as h:
        with torch.no_grad():
            model.generate(**inp, max_new_tokens=2, do_sample=False)
        assert h.last_stats.visual_tokens_in == [16] and h.last_stats.visual_tokens_kept == [4]


def test_qwen3_inner_layer_before_deepstack_is_refused(base):
    kind, model = base
    if kind != "qwen3_vl":
        pytest.skip("DeepStack is Qwen3-VL only")
    model = copy.deepcopy(model)
    with pytest.raises(tokenprune.ConfigError, match="DeepStack"):
        tokenprune.apply(model, "fastv", keep=KEEP, layer=1)
    assert tokenprune.get_handle(model) is None
    tokenprune.apply(model, "fastv", keep=KEEP, layer=2).remove()


def test_visionzip_cls_score_is_refused_without_cls(qm):
    kind, model = qm
    with pytest.raises(tokenprune.ConfigError, match="CLS"):
        tokenprune.apply(model, "visionzip", keep=KEEP, dominant_score="cls")
    assert tokenprune.get_handle(model) is None


def test_qwen25_default_object_layer_is_a_full_attention_block():
    model = build_qwen("qwen2_5_vl", vision_layers=8)
    model.model.visual.fullatt_block_indexes = [3, 7]
    h = tokenprune.apply(model, "hiprune", keep=KEEP)
    assert sorted(r.layer for r in h.requests) == [3, 7]
    h.remove()


def test_compact_positions_are_refused_for_mrope(qm):
    kind, model = qm
    with pytest.raises(tokenprune.ConfigError, match="M-RoPE"):
        tokenprune.apply(model, "hiprune", keep=KEEP, positions="compact")
    assert tokenprune.get_handle(model) is None


def test_flash_attention_2_llm_when_installed(base):
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("flash_attention_2 needs a CUDA device")
    kind, model = base
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    model.set_attn_implementation({"text_config": "flash_attention_2"})
    inp = {k: v.to("cuda") for k, v in inputs(kind, dtype=torch.bfloat16).items()}
    with tokenprune.apply(model, "hiprune", keep=KEEP) as h:
        with torch.no_grad():
            g = model.generate(**inp, max_new_tokens=3, do_sample=False)
        assert h.last_stats.visual_tokens_kept == [14] and g.shape[1] == inp["input_ids"].shape[1] + 3


@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_load_from_a_saved_folder_with_the_real_processor(kind, tmp_path):
    """The real path: save_pretrained, tokenprune.load (Auto classes), the family's own processor
    on a PIL image and on a video array (Qwen3: timestamps between frame groups)."""
    import numpy as np
    from PIL import Image

    from tokenprune.eval.tiny import build_qwen_processor

    build_qwen(kind).save_pretrained(tmp_path)
    build_qwen_processor(kind).save_pretrained(tmp_path)
    model, proc, h = tokenprune.load(str(tmp_path), "hiprune", keep=0.25)
    assert h.family.name == kind
    rng = np.random.default_rng(0)
    for content, kw in (("image", {"images": Image.fromarray(rng.integers(0, 255, (150, 230, 3), dtype=np.uint8))}),
                        ("video", {"videos": [rng.integers(0, 255, (8, 120, 160, 3), dtype=np.uint8)]})):
        msgs = [{"role": "user", "content": [{"type": content}, {"type": "text", "text": "what is this"}]}]
        if content == "video" and kind == "qwen3_vl":
            kw["videos_kwargs"] = {"video_metadata": [{"fps": 2.0, "total_num_frames": 8}]}
        enc = proc(text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt", **kw)
        grid = enc["image_grid_thw" if content == "image" else "video_grid_thw"][0]
        n = int(grid.prod()) // 4
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == enc["input_ids"].shape[1] + 3
        assert h.last_stats.visual_tokens_in == [n]
        assert h.last_stats.visual_tokens_kept == [round(0.25 * n)]

