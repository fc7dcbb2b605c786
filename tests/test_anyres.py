"""The conformance suite over LLaVA-NeXT and LLaVA-OneVision (anyres images, multi-image, video).

References are independent of the family module: scores from the vision tower of a deep copy run
eagerly with ``output_attentions``; their placement in the packed placeholder layout from the
model's own ``pack_image_features`` (image) / ``apply_pooling`` (video) run on the score maps; the
hand-fed reference slices the unpatched language model's inputs itself.
"""
from __future__ import annotations

import copy

import pytest
import torch

import tokenprune
from tokenprune.eval.tiny import ANYRES_IDS, ANYRES_KINDS, anyres_inputs, build_anyres, build_anyres_processor, random_image, random_video

# image-pruning strategies (the video-only ones, HoliTom and EVS, pass images whole: test_holitom_video.py,
# test_strategy_evs.py)
STRATEGIES = [s for s in tokenprune.list_strategies() if tokenprune.registry.get_strategy(s).images == "select"]
INNER = [s for s in STRATEGIES if tokenprune.registry.get_strategy(s).stage == "llm"]
VISION = [s for s in STRATEGIES if s not in INNER]
KEEP = 0.3


@pytest.fixture(scope="module", params=ANYRES_KINDS)
def base(request):
    return request.param, build_anyres(request.param), build_anyres_processor(request.param)


@pytest.fixture()
def am(base):
    kind, model, proc = base
    return kind, copy.deepcopy(model), proc


def cases(kind):
    """name -> processor kwargs: aspect ratios whose unpadding differs, several images, video."""
    out = {"wide": dict(images=[random_image(84, 112)]), "tall": dict(images=[random_image(150, 60, 1)]),
           "two_images": dict(images=[random_image(60, 60, 2), random_image(100, 200, 3)])}
    if kind == "llava_onevision":
        out["large"] = dict(images=[random_image(220, 230, 4)])           # anyres_max_9 downsampling
        out["video"] = dict(videos=[random_video(4, 60, 60, 5)])
        out["image_and_video"] = dict(images=[random_image(84, 112, 6)], videos=[random_video(4, 60, 60, 7)])
    return out


def inputs(proc, kind, name, dtype=None):
    inp = anyres_inputs(proc, **cases(kind)[name])
    if dtype is not None:
        inp = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inp.items()}
    return inp


def layouts(model, inp):
    """Placeholder runs in encoder order: (modality, row, cols, newline flags)."""
    core = model.model
    nl = core.image_newline
    with torch.no_grad():
        embeds = {}
        h = core.language_model.register_forward_pre_hook(
            lambda m, a, k: embeds.update(e=k["inputs_embeds"]), with_kwargs=True)
        model(**inp)
        h.remove()
    e = embeds["e"]
    out = []
    for m in ("image", "video"):
        feats = packed_features(model, inp, m)
        pos = torch.nonzero(inp["input_ids"] == ANYRES_IDS[m])
        start = 0
        for f in feats:
            chunk = pos[start:start + f.shape[0]]
            start += f.shape[0]
            row, cols = int(chunk[0, 0]), chunk[:, 1]
            out.append((m, row, cols, (e[row, cols] == nl.to(e.dtype)).all(-1)))
    return out


@torch.no_grad()
def packed_features(model, inp, modality):
    core = model.model
    if modality == "image" and "pixel_values" in inp:
        kw = {"batch_num_images": inp["batch_num_images"]} if "batch_num_images" in inp else {}
        return list(core.get_image_features(inp["pixel_values"], inp["image_sizes"], **kw).pooler_output)
    if modality == "video" and "pixel_values_videos" in inp:
        out = list(core.get_video_features(inp["pixel_values_videos"]).pooler_output)
        nl = core.image_newline.to(out[0].dtype)
        # transformers 5.17 appends the video's newline in forward, 5.24 in get_video_features
        return [f if bool((f[-1] == nl).all()) else torch.cat([f, nl[None]]) for f in out]
    return []


@torch.no_grad()
def eager_scores(model, inp, modality, requests):
    """Per crop / frame: {(layer, kind): [n, G*G] or [n, G*G, d]} from eager attention weights."""
    m = copy.deepcopy(model)
    m.set_attn_implementation({"vision_config": "eager"})
    tower = m.model.vision_tower
    seen = []
    hk = tower.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    packed_features(m, inp, modality)
    hk.remove()
    px = seen[0]
    layers = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers
    keys = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda mod, a, out, i=i: keys.__setitem__(i, out))
             for i, layer in enumerate(layers)]
    out = tower(px, output_attentions=True)
    for h in hooks:
        h.remove()
    cls = 1 if model.config.vision_config.model_type == "clip_vision_model" else 0
    heads = model.config.vision_config.num_attention_heads
    res = {}
    for r in requests:
        a = out.attentions[r.layer].float().mean(1)            # [n, N, N] head mean
        if r.kind == "mean":
            res[(r.layer, "mean")] = a.mean(1)[:, cls:]
        elif r.kind == "cls":
            res[(r.layer, "cls")] = a[:, 0, cls:]
        else:
            k = keys[r.layer]
            res[(r.layer, "keys")] = k.reshape(k.shape[0], k.shape[1], heads, -1).float().mean(2)[:, cls:]
    return res


def crops_per_image(model, inp):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    bn = inp.get("batch_num_images")
    patching = [n == 1 for n in bn.tolist() for _ in range(n)] if bn is not None else [True] * len(inp["image_sizes"])
    return [image_size_to_num_patches(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                                      patch_size=model.config.vision_config.image_size) if p else 1
            for s, p in zip(inp["image_sizes"], patching)]


def score_maps(model, inp, modality, scores):
    """Scores placed in each run's packed order by the model's own functions (newlines: 0)."""
    core = model.model
    out = []
    if modality == "image":
        counts = crops_per_image(model, inp)
        for key, v in scores.items():
            maps = v if v.dim() == 3 else v[..., None]
            chunks = list(torch.split(maps, counts))
            nl = torch.zeros(maps.shape[-1])
            if model.config.model_type == "llava_onevision":
                packed, _ = core.pack_image_features(chunks, inp["image_sizes"], image_newline=nl,
                                                     vision_aspect_ratio=model.config.vision_aspect_ratio)
            else:
                packed, _ = core.pack_image_features(chunks, inp["image_sizes"], "default", image_newline=nl)
            for i, p in enumerate(packed):
                if len(out) <= i:
                    out.append({})
                out[i][key] = p if v.dim() == 3 else p[:, 0]
        return out
    frames = inp["pixel_values_videos"].shape[1]
    for key, v in scores.items():
        maps = v if v.dim() == 3 else v[..., None]
        pooled = core.apply_pooling(maps)
        for i in range(pooled.shape[0] // frames):
            p = pooled[i * frames:(i + 1) * frames]
            if len(out) <= i:
                out.append({})
            out[i][key] = (p if v.dim() == 3 else p[..., 0])        # [F, P(, d)]
    return out


def expected(handle, model, inp):
    """Per run: (kept positions in the run, {position: merged feature})."""
    from tokenprune.sequence import split_budget
    from tokenprune.strategies.base import VisualTokens

    info = handle.family.vision_info
    res = []
    texts = iter([])
    if handle.spec.text:     # CDPruner: the LLM-input embeddings of the text after each run
        ids = inp["input_ids"]
        visual = (ids == ANYRES_IDS["image"]) | (ids == ANYRES_IDS["video"])
        emb = model.model.get_input_embeddings()(ids)
        valid = inp["attention_mask"].bool() if "attention_mask" in inp else torch.ones_like(visual)
        texts = iter([emb[row][(torch.arange(ids.shape[1]) > cols.max()) & ~visual[row] & valid[row]]
                      for _, row, cols, _ in layouts(model, inp)])
    for modality in ("image", "video"):
        feats = packed_features(model, inp, modality)
        if not feats:
            continue
        maps = score_maps(model, inp, modality, eager_scores(model, inp, modality, handle.requests))
        crops = crops_per_image(model, inp) if modality == "image" else None
        g = model.config.vision_config.image_size // model.config.vision_config.patch_size
        for i, f in enumerate(feats):
            text = next(texts, None)
            nl = (f == model.model.image_newline.to(f.dtype)).all(-1)
            units = []
            if modality == "image":
                g2 = g * g
                units.append((torch.arange(g2), (g, g), 1.0))
                if f.shape[0] > g2 + 1:
                    rows = int(nl[g2:].sum())
                    content = torch.nonzero(~nl).flatten()
                    canvas = content[content >= g2]
                    units.append((canvas, (rows, canvas.numel() // rows), float(crops[i] - 1)))
                sc = maps[i] if maps else {}
                unit_scores = [{k: v[pos] for k, v in sc.items()} for pos, _, _ in units]
            else:
                p = (g + 1) // 2
                n_frames = (f.shape[0] - 1) // (p * p)
                step = 1 if handle.spec.unit == "frame" else n_frames      # HoliTom: the whole video
                units = [(torch.arange(t * p * p, (t + step) * p * p), (p, p), 1.0)
                         for t in range(0, n_frames, step)]
                unit_scores = [{k: v[t:t + step].reshape(step * p * p, *v.shape[2:])
                                for k, v in (maps[i] if maps else {}).items()} for t in range(0, n_frames, step)]
            total = handle.config.tokens_for(sum(u[0].numel() for u in units))
            budgets = split_budget(total, [u[0].numel() for u in units], [u[2] for u in units])
            kept, merged = [torch.nonzero(nl).flatten()], {}
            if modality == "image" and handle.spec.images == "keep":       # a video method: images whole
                res.append((torch.arange(f.shape[0]), {}))
                continue
            for (pos, grid, _), sc, n in zip(units, unit_scores, budgets):
                frames = pos.numel() // (grid[0] * grid[1])
                sel = handle.spec.select(handle.config, VisualTokens(grid=grid, features=f[pos], scores=sc,
                                                                     frames=frames, text=text), n, info)
                kept.append(pos[sel.indices])
                if sel.features is not None:
                    merged.update({int(pos[j]): sel.features[k] for k, j in enumerate(sel.indices)})
            res.append((torch.sort(torch.cat(kept)).values, merged))
    return res


@torch.no_grad()
def hand_fed(clean, inp, runs, exp):
    def pre(mod, args, kw):
        e = kw["inputs_embeds"].clone()
        keep = torch.ones(e.shape[:2], dtype=torch.bool)
        for (_, row, cols, _), (kept, merged) in zip(runs, exp):
            keep[row, cols] = False
            keep[row, cols[kept]] = True
            for j, v in merged.items():
                e[row, cols[j]] = v.to(e.dtype)
        idx = torch.nonzero(keep[0]).flatten()
        new = dict(kw)
        new["inputs_embeds"] = e[:, idx]
        new["attention_mask"] = kw["attention_mask"][:, idx]
        new["position_ids"] = idx[None]
        return args, new
    h = clean.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return clean(**inp).logits
    finally:
        h.remove()


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STRATEGIES)
def test_keep_one_is_bit_identical(am, name):
    kind, model, proc = am
    for case in cases(kind):
        inp = inputs(proc, kind, case)
        with torch.no_grad():
            ref = model(**inp).logits
            ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
        with tokenprune.apply(model, name, keep=1.0):
            with torch.no_grad():
                assert torch.equal(model(**inp).logits, ref), case
                assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen), case


@pytest.mark.parametrize("name", VISION)
def test_pruned_equals_hand_fed_kept_tokens(am, name):
    kind, model, proc = am
    clean = copy.deepcopy(model)
    h = tokenprune.apply(model, name, keep=KEEP)
    for case in cases(kind):
        inp = inputs(proc, kind, case)
        with torch.no_grad():
            out = model(**inp).logits
        runs = layouts(clean, inp)
        exp = expected(h, clean, inp)
        assert len(exp) == len(runs) == len(h.last_stats.kept_indices[0])
        for got, (kept, _) in zip(h.last_stats.kept_indices[0], exp):
            assert torch.equal(got, kept), case
        ref = hand_fed(clean, inp, runs, exp)
        torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-5, msg=case)


@pytest.mark.parametrize("name", STRATEGIES)
def test_newline_tokens_keep_the_unpatched_layout(am, name):
    """Every newline token reaches the LLM, in the same order relative to the kept tokens, and
    none counts toward the budget: content kept = round(keep x content tokens) per run."""
    kind, model, proc = am
    nl = model.model.image_newline
    for case in cases(kind):
        inp = inputs(proc, kind, case)
        runs = layouts(model, inp)
        h = tokenprune.apply(model, name, keep=KEEP)
        seen = {}
        lm = model.model.language_model if name not in INNER else model.model.language_model.layers[h.llm_layer]
        hk = lm.register_forward_pre_hook(
            lambda m, a, k, seen=seen: seen.update(e=k.get("inputs_embeds", a[0] if a else k.get("hidden_states"))),
            with_kwargs=True)
        with torch.no_grad():
            model(**inp)
        hk.remove()
        st = h.last_stats
        h.remove()
        n_nl = sum(int(f.sum()) for *_, f in runs)
        assert st.layout_tokens == [n_nl], case                  # the stats say which tokens are layout
        if name not in INNER:
            assert int((seen["e"] == nl.to(seen["e"].dtype)).all(-1).sum()) == n_nl, case
        for (*_, flags), kept in zip(runs, st.kept_indices[0]):
            assert bool(flags[kept].sum() == flags.sum()), case                     # all newlines kept
            content = int((~flags).sum())
            assert kept.numel() - int(flags.sum()) == round(KEEP * content), case    # exact content budget


def test_holitom_on_onevision_video(base):
    kind, model, proc = base
    if kind != "llava_onevision":
        pytest.skip("video is OneVision's")
    model = copy.deepcopy(model)
    inp = inputs(proc, kind, "image_and_video")
    with torch.no_grad():
        ref = model(**inp).logits
    runs = layouts(model, inp)
    with tokenprune.apply(model, "holitom", keep=1.0, inner_merge=False):
        with torch.no_grad():
            assert torch.equal(model(**inp).logits, ref)
    with tokenprune.apply(model, "holitom", keep=0.25) as h:
        with torch.no_grad():
            model.generate(**inp, max_new_tokens=2, do_sample=False)
        st = h.last_stats
        img, vid = st.kept_indices[0]
        assert img.numel() == runs[0][2].numel()                             # the image passes whole
        assert vid.numel() == round(0.25 * 4 * 4) + 1                        # 16 pooled tokens + newline
        assert st.layout_tokens == [sum(int(r[3].sum()) for r in runs)]      # newlines of the image and the video
        assert st.inner_tokens_kept[0] < st.visual_tokens_kept[0]


def test_budget_larger_than_the_content_is_an_error(am):
    kind, model, proc = am
    inp = inputs(proc, kind, "tall")
    with tokenprune.apply(model, "hiprune", budget=10_000):
        with pytest.raises(tokenprune.ConfigError, match="more than"):
            with torch.no_grad():
                model(**inp)


def test_load_from_a_saved_folder(base, tmp_path):
    kind, model, proc = base
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    m, p, h = tokenprune.load(str(tmp_path), "visionzip", keep=KEEP)
    assert h.family.name == kind
    inp = anyres_inputs(p, images=[random_image(84, 112)])
    with torch.no_grad():
        g = m.generate(**inp, max_new_tokens=2, do_sample=False)
    assert g.shape[1] == inp["input_ids"].shape[1] + 2
    assert h.last_stats.visual_tokens_kept[0] < h.last_stats.visual_tokens_in[0]


def test_holitom_outer_on_onevision_equals_reference_and_hand_fed(base):
    """HoliTom w/o M on OneVision: the video's kept tokens and merged static features from eager
    scores pooled by the model's own ``apply_pooling``; logits equal the hand-fed reference."""
    kind, model, proc = base
    if kind != "llava_onevision":
        pytest.skip("video is OneVision's")
    model = copy.deepcopy(model)
    clean = copy.deepcopy(model)
    inp = inputs(proc, kind, "image_and_video")
    h = tokenprune.apply(model, "holitom", keep=0.25, inner_merge=False)
    with torch.no_grad():
        out = model(**inp).logits
    runs = layouts(clean, inp)
    exp = expected(h, clean, inp)
    for got, (kept, _) in zip(h.last_stats.kept_indices[0], exp):
        assert torch.equal(got, kept)
    torch.testing.assert_close(out, hand_fed(clean, inp, runs, exp), atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["hiprune", "random"])
def test_two_rows_with_the_same_image_are_not_beam_copies(am, name):
    """Equal images in different rows are two encodings (only generate's own copies of one prompt
    share a layout): a batch of the same image twice equals each row alone."""
    kind, model, proc = am
    img = random_image(84, 112, 1)
    proc.tokenizer.padding_side = "left"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]
    texts = [proc.apply_chat_template(chat, add_generation_prompt=True)] * 2
    inp = dict(proc(text=texts, images=[img, img], return_tensors="pt", padding=True))
    single = anyres_inputs(proc, images=[img])
    with tokenprune.apply(model, name, keep=KEEP):
        with torch.no_grad():
            both = model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            one = model.generate(**single, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(both[0, -3:], one[0, -3:]) and torch.equal(both[1, -3:], one[0, -3:])
