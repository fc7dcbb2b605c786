"""InternVL (``InternVLForConditionalGeneration``): the conformance kit, and references of its own.

References are independent of the family module: vision scores from an eager copy of the tower
(``output_attentions``), the CLS column dropped, pooled over each 2 x 2 block of the patch grid by a
plain reshape (what ``pixel_shuffle`` groups: checked on an index map through the model's own op); placeholder runs
found in the ids; each image's budget split over its tiles with the engine's ``split_budget``; the
strategy's own ``select`` per tile; the hand-fed reference slices the unpatched language model's inputs.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GenerationMixin

import tokenprune
from tokenprune import registry
from tokenprune.eval import tiny_internvl as t
from tokenprune.eval.tiny import random_image, random_video
from tokenprune.testing import ConformanceSuite, FamilyCase, LMInputs, gather_lm_kwargs

pytest.importorskip("transformers.models.internvl", reason="this transformers has no InternVL")

STRATEGIES = [s for s in tokenprune.list_strategies() if s != "holitom"]   # HoliTom's outer stage: video only
KEEP = 0.3
T = t.TOKENS_PER_TILE
G = t.TILE // t.PATCH            # patches a side of a tile


#: transformers < 5.24 expands a prompt for beams by ``repeat_interleave`` of every tensor, InternVL's flat
#: tile batch too: the beams of a prompt of several tiles then see other tiles (the unpatched model as
#: well, shown by test_old_beam_expansion_mixes_tiles_unpatched); 5.24 expands pre-encoded images per prompt
OLD_BEAMS = not hasattr(GenerationMixin, "_expand_multimodal_outputs")


# the whole kit on this family: in the slow suite (CI runs it on the newest transformers)
@pytest.mark.slow
class TestKit(ConformanceSuite):
    cases = [t.case()]
    strategies = [*STRATEGIES, ("visionzip", {}, ("fastv", {"keep": 0.5}))]

    @pytest.mark.parametrize("mode", [{"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}],
                             ids=["beam3", "return2"])
    def test_beam_search_equals_unpatched_fed_the_kept_tokens(self, combo, mode):
        if OLD_BEAMS:
            pytest.skip("transformers < 5.24 repeats InternVL's flat tile batch per tile for beams, so the unpatched "
                        "model's beams of a multi-tile prompt already see the wrong tiles (one-tile prompts: "
                        "test_beam_search_on_a_one_tile_prompt)")
        super().test_beam_search_equals_unpatched_fed_the_kept_tokens(combo, mode)


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------

_BUILT: dict[tuple, object] = {}


def model_of(**kw):
    key = tuple(sorted(kw.items()))
    if key not in _BUILT:
        _BUILT[key] = t.build(**kw)
    return copy.deepcopy(_BUILT[key])


def runs(ids_row: torch.Tensor) -> list[torch.Tensor]:
    """Columns of each ``<IMG_CONTEXT>`` run of one row (one per image / video frame), in order."""
    pos = torch.nonzero(ids_row == t.IDS["context"]).flatten()
    cut = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    return list(torch.tensor_split(pos, cut.tolist()))


def block_mean(v: torch.Tensor) -> torch.Tensor:
    """[n, G*G(, d)] per-patch values -> [n, (G/2)^2(, d)]: the mean of each 2 x 2 block, raster order."""
    n = v.shape[0]
    x = v.reshape(n, G // 2, 2, G // 2, 2, -1).mean((2, 4)).reshape(n, T, -1)
    return x[..., 0] if v.dim() == 2 else x


@torch.no_grad()
def eager_scores(model, pixel_values, requests):
    """Per tile: {(layer, kind): [n, T] or [n, T, d]} from eager attention weights of a copy."""
    m = copy.deepcopy(model)
    m.set_attn_implementation({"vision_config": "eager"})
    tower = m.model.vision_tower
    keys = {}
    hooks = [layer.attention.k_norm.register_forward_hook(lambda mod, a, out, i=i: keys.__setitem__(i, out))
             for i, layer in enumerate(tower.encoder.layer)]
    out = tower(pixel_values, output_attentions=True)
    for hk in hooks:
        hk.remove()
    heads = model.config.vision_config.num_attention_heads
    res = {}
    for r in requests:
        a = out.attentions[r.layer].float().mean(1)          # [n, 1+N, 1+N] head mean
        if r.kind == "mean":
            per_patch = a.mean(1)[:, 1:]
        elif r.kind == "cls":
            per_patch = a[:, 0, 1:]
        else:
            k = keys[r.layer].float()
            per_patch = k.reshape(k.shape[0], k.shape[1], heads, -1).mean(2)[:, 1:]
        res[(r.layer, r.kind)] = block_mean(per_patch)
    return res


@torch.no_grad()
def projected(model, pixel_values):
    return model.model.get_image_features(pixel_values=pixel_values).pooler_output      # [tiles, T, D]


def expected_kept(handle, clean, inp):
    """Per run of row 0: the kept positions the strategy's own rule gives on eager scores, the run's
    budget split over its tiles."""
    from tokenprune.sequence import split_budget
    from tokenprune.strategies.base import VisualTokens

    spec, cfg, info = handle.vspec, handle.vconfig, handle.family.vision_info
    px = inp["pixel_values"]
    scores = eager_scores(clean, px, handle.requests)
    feats = projected(clean, px)
    out, tile = [], 0
    for run in runs(inp["input_ids"][0]):
        tiles = run.numel() // T
        shares = split_budget(cfg.tokens_for(run.numel()), [T] * tiles)
        kept = []
        for j, n_keep in enumerate(shares):
            tok = VisualTokens(grid=(G // 2, G // 2), features=feats[tile + j],
                               scores={k: v[tile + j] for k, v in scores.items()})
            if n_keep:
                kept.append(spec.select(cfg, tok, n_keep, info).indices.cpu() + j * T)
        out.append(torch.sort(torch.cat(kept)).values)
        tile += tiles
    return out


@torch.no_grad()
def hand_fed(clean, inp, kept):
    """The unpatched model whose language model gets the text and only the ``kept`` run positions."""
    ids = inp["input_ids"][0]
    keep = ids != t.IDS["context"]
    for run, k in zip(runs(ids), kept):
        keep[run[k]] = True
    cap = LMInputs(clean)
    clean(**inp)
    kw = gather_lm_kwargs(cap.close(), keep)
    return clean.lm_head(clean.model.language_model(**kw).last_hidden_state)


def image_inputs(name):
    """Prompts through the real processor: tile grids of several shapes, several images, a video."""
    return {"wide": lambda: t.encode(images=[random_image(t.TILE, 2 * t.TILE, 1)]),
            "tall_and_square": lambda: t.encode(images=[random_image(150, 60, 2), random_image(t.TILE, t.TILE, 3)]),
            "grid_2x2": lambda: t.encode(images=[random_image(100, 110, 4)]),
            "image_and_video": lambda: t.inputs(5)}[name]()


CASES = ["wide", "tall_and_square", "grid_2x2", "image_and_video"]
VARIANTS = {"plain": {}, "qknorm_layer-2": {"qk_norm": True, "feature_layer": -2}}


# ----------------------------------------------------------------------------------------------
# family-specific checks
# ----------------------------------------------------------------------------------------------

def test_pixel_shuffle_groups_2x2_blocks_in_raster_order():
    """What the reference pools by: token (i, j) of a tile carries patches (2i..2i+1, 2j..2j+1)."""
    model = model_of()
    x = torch.arange(G * G, dtype=torch.float32).reshape(1, G, G, 1)
    y = model.model.pixel_shuffle(x, scale_factor=0.5).reshape(T, 4)
    ref = torch.arange(G * G, dtype=torch.float32).reshape(G // 2, 2, G // 2, 2).permute(0, 2, 1, 3).reshape(T, 4)
    assert torch.equal(torch.sort(y, 1).values, ref)
    assert torch.equal(tokenprune.api.family_for(model).pool_scores(x.reshape(1, G * G)), block_mean(x.reshape(1, -1)))


def test_tiles_and_frames_are_the_processors():
    """The tiny processor tiles as the real one does: 2x1 + thumbnail, 1x3 + thumbnail, one tile;
    every video frame is a one-tile run of its own."""
    inp = image_inputs("tall_and_square")
    assert inp["pixel_values"].shape[0] == 5 and [r.numel() for r in runs(inp["input_ids"][0])] == [4 * T, T]
    inp = t.inputs(0)
    assert inp["pixel_values"].shape[0] == 5 and [r.numel() for r in runs(inp["input_ids"][0])] == [3 * T, T, T]


#: (input, tower variant): every layout on the plain tower, two on the QK-norm / layer -2 one
LAYOUTS = [(which, "plain") for which in CASES] + [(which, "qknorm_layer-2") for which in ("wide", "image_and_video")]


@pytest.mark.parametrize("which,variant", LAYOUTS, ids=[f"{w}-{v}" for w, v in LAYOUTS])
@pytest.mark.parametrize("name", ["hiprune", "fopru", "visionzip", "vispruner", "divprune"])
def test_selection_equals_the_strategy_on_eager_pooled_scores(name, which, variant):
    """Kept set per image / frame == the strategy's own rule per tile on eager vision scores pooled
    over the pixel-shuffle groups, with the image's budget split over its tiles; the pruned logits
    equal the unpatched model fed the kept tokens (VisionZip merges: its kept set only)."""
    model = model_of(**VARIANTS[variant])
    clean = copy.deepcopy(model)
    inp = image_inputs(which)
    with tokenprune.apply(model, name, keep=KEEP) as h:
        with torch.no_grad():
            out = model(**inp).logits
        got = h.last_stats.kept_indices[0]
        merged = any(g is not None for g in h.last_stats.merge_groups[0])
    want = expected_kept(h, clean, inp)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if not merged:
        torch.testing.assert_close(out, hand_fed(clean, inp, got), atol=3e-5, rtol=1e-5)


def test_tiles_get_their_budget_shares():
    """budget=10 over a 3-tile image: 4, 3, 3 (largest remainder, earlier tile first); keep=0.3 of a
    4-tile image: round(19.2) = 19 -> 5, 5, 5, 4; a one-tile image keeps round(0.3 * 16) = 5."""
    model = model_of()
    inp = image_inputs("wide")
    with tokenprune.apply(model, "random", budget=10) as h:
        with torch.no_grad():
            model(**inp)
        kept = h.last_stats.kept_indices[0][0]
    assert torch.bincount(kept // T, minlength=3).tolist() == [4, 3, 3]
    inp = image_inputs("tall_and_square")
    with tokenprune.apply(model, "hiprune", keep=KEEP) as h:
        with torch.no_grad():
            model(**inp)
        tall, square = h.last_stats.kept_indices[0]
    assert torch.bincount(tall // T, minlength=4).tolist() == [5, 5, 5, 4] and square.numel() == 5


def test_video_frames_are_pruned_as_one_tile_images_and_video_methods_are_refused():
    model = model_of()
    clean = copy.deepcopy(model)
    inp = t.encode(videos=[random_video(3, 60, 60, 9)], question="what is this")
    assert [r.numel() for r in runs(inp["input_ids"][0])] == [T, T, T]
    with tokenprune.apply(model, "fopru", keep=0.25) as h:
        with torch.no_grad():
            out = model(**inp).logits
        got = h.last_stats.kept_indices[0]
    assert [k.numel() for k in got] == [4, 4, 4]
    torch.testing.assert_close(out, hand_fed(clean, inp, got), atol=3e-5, rtol=1e-5)
    for name in ("holitom", "evs"):
        with pytest.raises(tokenprune.IncompatibleStrategyError):
            tokenprune.apply(model, name, keep=0.25)
    assert tokenprune.get_handle(model) is None


def test_beam_copies_of_a_multi_tile_prompt_keep_one_selection():
    """generate's beams repeat a prompt's tiles (transformers >= 5.24: pre-encoded, copied by value);
    every copy keeps the prompt's own selection."""
    if OLD_BEAMS:
        pytest.skip("transformers < 5.24 gives the beams of a multi-tile prompt other tiles (see OLD_BEAMS)")
    model = model_of()
    inp = image_inputs("tall_and_square")
    with tokenprune.apply(model, "hiprune", keep=KEEP) as h:
        with torch.no_grad():
            model(**inp)
        single = h.last_stats.kept_indices[0]
        with torch.no_grad():
            model.generate(**inp, max_new_tokens=2, num_beams=3, num_return_sequences=3, do_sample=False,
                           suppress_tokens=list(t.IDS.values()))
        st = h.last_stats
    assert len(st.kept_indices) == 3
    for row in st.kept_indices:
        assert all(torch.equal(a, b) for a, b in zip(row, single))


def test_full_select_strategy_is_refused():
    model = model_of()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(tokenprune.UnsupportedModelError, match="CLS"):
        tokenprune.apply(model, "hiprune", keep=KEEP)


def test_bench_inputs_run_on_the_model():
    model = model_of()
    fam = tokenprune.api.family_for(model)
    inp = fam.bench_inputs(2, 12, size=(t.TILE, 2 * t.TILE))        # 2 x 1 tiles + thumbnail
    n = t.processor().image_processor.get_number_of_image_patches(t.TILE, 2 * t.TILE, {"max_patches": 12})
    assert n == 3 and inp["pixel_values"].shape == (2 * n, 3, t.TILE, t.TILE)
    assert ((inp["input_ids"] == t.IDS["context"]).sum(1) == n * T).all()
    with tokenprune.apply(model, "hiprune", keep=0.25) as h:
        with torch.no_grad():
            model(**inp)
        assert h.last_stats.visual_tokens_kept == [12, 12]


def test_overlay_draws_the_tile_canvas_and_the_thumbnail():
    model = model_of()
    fam = tokenprune.api.family_for(model)
    img = random_image(t.TILE, 2 * t.TILE, 1)
    inp = t.encode(images=[img])
    with tokenprune.apply(model, "hiprune", keep=KEEP) as h:
        with torch.no_grad():
            model(**inp)
        kept = h.last_stats.kept_indices[0][0]
    two = fam.image_overlay(img, kept, None, t.processor(), inp)
    one_tile = random_image(t.TILE, t.TILE, 2)
    single = fam.image_overlay(one_tile, None, None, t.processor(), t.encode(images=[one_tile]))
    assert two.size[0] == 2 * 256          # two panels of 256 px (visualize.grid)
    assert single.size == one_tile.size


def test_load_from_a_saved_folder(tmp_path):
    t.save(tmp_path)
    model, proc, h = tokenprune.load(str(tmp_path), "visionzip", keep=KEEP)
    assert h.family.name == "internvl" and type(proc).__name__ == "InternVLProcessor"
    inp = t.encode(images=[random_image(t.TILE, 2 * t.TILE, 1)], proc=proc)
    with torch.no_grad():
        g = model.generate(**inp, max_new_tokens=2, do_sample=False)
    assert g.shape[1] == inp["input_ids"].shape[1] + 2
    assert h.last_stats.visual_tokens_in == [3 * T] and h.last_stats.visual_tokens_kept == [round(KEEP * 3 * T)]


def test_cli_run_on_a_saved_folder(tmp_path):
    t.save(tmp_path / "ivl")
    res = subprocess.run([sys.executable, "-m", "tokenprune.cli", "run", "--model", str(tmp_path / "ivl"),
                          "--strategy", "hiprune", "--keep", "0.25", "--json", "--overlay", str(tmp_path / "o.png")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout[res.stdout.index("{"):])
    n = report["visual_tokens_in"]
    assert n % T == 0 and report["visual_tokens_kept"] == round(0.25 * n)
    assert sum(len(k) for k in report["kept_indices"]) == report["visual_tokens_kept"]
    assert (tmp_path / "o.png").exists()


def test_cli_run_on_a_video_prunes_every_frame_as_a_one_tile_image(tmp_path):
    """``run --video``: the processor's frames reach the model as one-tile images, each with its share of
    the budget; the overlay has one panel per frame, with the kept tiles' tokens of that frame."""
    from tokenprune.runner import Runner, open_video

    t.save(tmp_path / "ivl")
    np_path = tmp_path / "clip.npy"
    np.save(np_path, random_video(4, 2 * t.TILE, 2 * t.TILE, 3))
    res = subprocess.run([sys.executable, "-m", "tokenprune.cli", "run", "--model", str(tmp_path / "ivl"), "--video",
                          str(np_path), "--strategy", "hiprune", "--keep", "0.25", "--json",
                          "--overlay", str(tmp_path / "v.png")], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout[res.stdout.index("{"):])
    assert report["visual_tokens_in"] == 4 * T and report["visual_tokens_kept"] == 4 * round(0.25 * T)
    assert [len(k) for k in report["kept_indices"]] == [round(0.25 * T)] * 4     # one unit per frame
    assert (tmp_path / "v.png").exists()
    # the overlay's kept boxes: the family maps the clip's frame-major indices onto each frame
    runner = Runner(str(tmp_path / "ivl"))
    frames = open_video(np_path)
    out = runner.run(None, "what is in the image", "hiprune", video=frames, keep=0.25)
    unpruned = runner.run(None, "what is in the image", None, video=frames)
    assert out.overlay.size == unpruned.overlay.size and out.overlay.tobytes() != unpruned.overlay.tobytes()


def test_every_strategy_but_the_video_ones_is_served():
    fam = tokenprune.api.family_for(model_of())
    refused = [s for s in tokenprune.list_strategies() if not set(registry.get_strategy(s).needs) <= fam.provides]
    assert sorted(refused) == ["evs", "holitom"]


def _beams(model, inp, mode):
    with torch.no_grad():
        return model.generate(**inp, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              suppress_tokens=list(t.IDS.values()), **mode)


@pytest.mark.skipif(not OLD_BEAMS, reason="transformers >= 5.24 expands InternVL's tiles per prompt")
def test_old_beam_expansion_mixes_tiles_unpatched():
    """Why the kit's beam check is skipped on transformers < 5.24: the unpatched model's beams of a
    multi-tile prompt differ from beams over that prompt's own LLM input."""
    model = model_of()
    inp = t.inputs(0)
    cap = LMInputs(model)
    with torch.no_grad():
        model(**inp)
    e = cap.close()["inputs_embeds"]
    ideal = _beams(model, {"inputs_embeds": e, "attention_mask": torch.ones(e.shape[:2], dtype=torch.long)},
                   {"num_beams": 3})
    assert not torch.equal(_beams(model, inp, {"num_beams": 3})[:, -4:], ideal[:, -4:])


@pytest.mark.parametrize("name", ["hiprune", "cdpruner", "fastv", "visionzip"])
def test_beam_search_on_a_one_tile_prompt(name):
    """The kit's beam check on a prompt of one one-tile image (whose beams every transformers expands right)."""
    one = t.encode(images=[random_image(t.TILE, t.TILE, 3)])
    case = FamilyCase("internvl-one-tile", build=lambda dtype=torch.float32: model_of(), inputs=lambda seed: one,
                      suppress=tuple(t.IDS.values()))

    class One(ConformanceSuite):
        cases = [case]
        strategies = [name]
    for mode in ({"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}):
        ConformanceSuite.test_beam_search_equals_unpatched_fed_the_kept_tokens(One(), (case, (name, {}, None)), mode)
