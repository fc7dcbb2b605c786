"""The bench presets' geometries, checked on the meta device (no weights, no time): every model builds
as the family the preset names, the real-size configs have their checkpoints' parameter counts, the
synthetic inputs carry as many placeholders as the vision tower gives features, and every strategy
a preset runs is accepted by ``apply`` at every budget (a refusal would otherwise surface only on
the lent GPU, as a lost row)."""
from __future__ import annotations

import math

import pytest
import torch

import tokenprune
from tokenprune.api import family_for
from tokenprune.eval.bench.presets import PRESETS, ModelPreset, build
from tokenprune.eval.bench.run import Bench, _features, _vision_call, placeholder_id

CASES = [pytest.param(name, mp, id=f"{name}:{mp.name}") for name in ("cpu", "gpu") for mp in PRESETS[name].models]

#: published sizes of the real checkpoints the GPU preset's configs describe (parameters, billions)
PUBLISHED_B = {
    "llava-1.5-7b": 7.06, "llava-next-7b (anyres)": 7.06, "qwen2.5-vl-7b (1008 px)": 8.29,
    "llava-ov-7b video (32 fr)": 8.03, "internvl3-8b (5 tiles)": 7.94, "gemma-3-4b (256 tok)": 4.30,
}
#: visual tokens per row the presets' comments promise
PLACEHOLDERS = {
    "llava-mid (576 tok)": 576, "qwen3.5-mid (256 tok)": 256, "internvl-mid (5 tiles)": 320,
    "gemma3-mid (256 tok)": 256, "llava-next-7b (anyres)": 2928, "qwen2.5-vl-7b (1008 px)": 1296,
    "llava-ov-7b video (32 fr)": 6273, "llava-1.5-7b": 576, "qwen3.5 (4096 x 32, 1024 px)": 1024,
    "internvl3-8b (5 tiles)": 1280, "gemma-3-4b (256 tok)": 256,
}


@pytest.fixture(scope="module")
def models():
    cache: dict[str, torch.nn.Module] = {}

    def get(mp: ModelPreset) -> torch.nn.Module:
        if mp.name not in cache:
            cache[mp.name] = build(mp, "meta")
        return cache[mp.name]
    return get


@pytest.mark.parametrize("preset,mp", CASES)
def test_the_preset_builds_as_its_family(preset, mp, models):
    model = models(mp)
    assert family_for(model).name == mp.family
    n = sum(p.numel() for p in model.parameters()) / 1e9
    if mp.name in PUBLISHED_B:
        assert math.isclose(n, PUBLISHED_B[mp.name], rel_tol=0.01), n
    if preset == "cpu":
        assert 0.01 < n < 0.05      # mid-size: a few tens of millions, minutes on two cores


@pytest.mark.parametrize("preset,mp", CASES)
def test_placeholders_match_the_towers_features(preset, mp, models):
    model = models(mp)
    family = family_for(model)
    inp = family.bench_inputs(1, mp.text_tokens, size=mp.size, video_frames=mp.video_frames)
    n = int((inp["input_ids"][0] == placeholder_id(mp, family)).sum())
    if mp.name in PLACEHOLDERS:
        assert n == PLACEHOLDERS[mp.name]
    if "image_grid_thw" in inp:
        # Qwen reads grid_thw on the host, which a meta tower cannot: the merger's 2 x 2 groups
        grid = inp["image_grid_thw"]
        assert int(grid.prod(-1).sum()) == inp["pixel_values"].shape[0] == 4 * n
        return
    meta = {k: (v.to("meta", mp.dtype) if v.is_floating_point() else v) for k, v in inp.items()}
    with torch.no_grad():
        feats = _features(_vision_call(model.model, meta))
    if mp.video_frames and family.name == "llava_onevision" and feats.shape[0] == n - 1:
        # transformers < 5.24 appends the video's one newline in forward, after get_video_features
        assert model.model.image_newline is not None
        return
    assert feats.shape[0] == n


@pytest.mark.parametrize("preset,mp", CASES)
def test_every_strategy_the_preset_runs_is_accepted(preset, mp, models):
    model = models(mp)
    names = Bench(PRESETS[preset], "meta").strategies_for(mp)
    assert names
    for name in names:
        for budget in mp.budgets:
            h = tokenprune.apply(model, name, budget=budget, **mp.options.get(name, {}))
            h.remove()
    assert tokenprune.get_handle(model) is None


def test_qwen3_5_inner_methods_need_the_options(models):
    """Without its options, FastV's default K = 2 would score on a Gated-DeltaNet layer: the preset
    passes K = 4 (after the first full-attention layer, 3), as the family's error says."""
    mp = next(m for m in PRESETS["gpu"].models if m.family == "qwen3_5")
    model = models(mp)
    with pytest.raises(tokenprune.ConfigError, match="layer >= 4"):
        tokenprune.apply(model, "fastv", budget=mp.budgets[0])
    assert mp.options["fastv"] == {"layer": 4}
