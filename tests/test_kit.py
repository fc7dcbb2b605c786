"""The public conformance kit (``tokenprune.testing``) over every built-in family and strategy,
plus a stacked pair: the invariants every family and strategy share. Family-specific references
(eager vision scores mapped through each layout) stay in the family test files."""
from __future__ import annotations

import tokenprune
from tokenprune.testing import ConformanceSuite, builtin_cases

# HoliTom's outer stage is video-only and checked against its reference in test_holitom_video.py
STRATEGIES = [s for s in tokenprune.list_strategies() if s != "holitom"]


class TestBuiltins(ConformanceSuite):
    cases = builtin_cases()
    strategies = [*STRATEGIES, ("visionzip", {}, ("fastv", {"keep": 0.5}))]


class TestLlavaParameterVariants(ConformanceSuite):
    """Parameters that change which code path runs (FoPru's modes, FastV / HoliTom-M at K=1, PruMerge's variants)."""
    cases = builtin_cases()[:1]
    strategies = [("fopru", {"mode": "rank"}), ("fopru", {"mode": "row"}), ("fastv", {"layer": 1}),
                  ("holitom_inner", {"layer": 1, "weighting": "mean"}),
                  # without its merge PruMerge+ is a pure selection: the hand-fed equality runs too
                  ("prumerge", {"merge": False}), ("prumerge", {"merge": False, "plus": False})]


def test_every_bench_preset_gets_its_inputs_from_its_family():
    """No family branches in the bench: each preset's model (real sizes too, on the meta device)
    builds its own rows through ``Family.bench_inputs``, with its placeholders where the model puts them."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tokenprune.api import family_for
    from tokenprune.eval.bench.presets import PRESETS

    for preset in PRESETS.values():
        for mp in preset.models:
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(mp.config())
            family = family_for(model)
            inp = family.bench_inputs(2, mp.text_tokens, size=mp.size, video_frames=mp.video_frames)
            token = family.video_token_id if mp.video_frames else family.image_token_id
            n = (inp["input_ids"] == token).sum(1)
            assert inp["input_ids"].shape[0] == 2 and bool((n == n[0]).all()) and int(n[0]) > 0, mp.name
            assert inp["input_ids"].shape[1] >= int(n[0]) + mp.text_tokens // 2, mp.name
