"""``torch.compile`` over a pruned model (#26, goal 1, the CPU part): the compiled forward gives the
eager pruned logits and stats, and the graph breaks the package adds over the unpatched model are
counted exactly, each one named, so that a new one fails here. ``aot_eager``: dynamo's capture and
AOT autograd without code generation (what decides graph breaks; seconds on CPU).

Breaks the hooks still add on LLaVA-1.5 (transformers 5.24, torch 2.14): the per-call state in a
``ContextVar`` (thread safety for concurrent callers; dynamo cannot trace ``ContextVar.set``) at the
model's pre-hook and the vision tower's pre-hook, plus the capture's at the scoring layer
(hiprune); random's seeded ``torch.Generator``. The host clock of ``prune_ms`` (``state.clock`` is 0
while compiling) and the debug log line no longer break."""
from __future__ import annotations

import pytest
import torch

import tokenprune
from tokenprune.eval.tiny import build_llava, prompt_ids
from tokenprune.testing import cache_kwarg

NEWEST = cache_kwarg() == "cache"
_CTX = "ContextVar mutation not supported @ engine.py"
#: the graph-break causes added over the unpatched model (dynamo's reason, file), per strategy
ADDED_BREAKS = {"random": {_CTX: 2, "An opaque object was created in the midd @ baselines.py": 2},
                "hiprune": {_CTX: 3}}


def _inputs():
    ids = prompt_ids(64, n_images=1, seed=0)
    g = torch.Generator().manual_seed(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 112, 112, generator=g)}


@pytest.mark.parametrize("strategy", ["hiprune", "visionzip", "pool"])
def test_compiled_pruned_forward_equals_eager(strategy):
    model, inputs = build_llava(seed=0), _inputs()
    h = tokenprune.apply(model, strategy, budget=16)
    try:
        with torch.no_grad():
            eager = model(**inputs, use_cache=False).logits
            torch._dynamo.reset()
            out = torch.compile(model, backend="aot_eager")(**inputs, use_cache=False).logits
        torch.testing.assert_close(out, eager)
        assert out.shape[1] == 64 - 64 + 16 + (inputs["input_ids"].shape[1] - 64)
        assert int(h.last_stats.visual_tokens_kept[0]) == 16
    finally:
        h.remove()
        torch._dynamo.reset()


def test_the_clock_is_zero_while_compiling():
    from tokenprune.state import clock

    assert clock() > 0
    torch._dynamo.reset()
    traced = torch.compile(lambda x: x + clock(), backend="eager", fullgraph=True)
    assert traced(torch.zeros(1)).item() == 0.0


def _reasons(model, inputs):
    """Dynamo's graph-break causes (reason, file) of one traced forward, from a reset."""
    from collections import Counter

    torch._dynamo.reset()
    with torch.no_grad():
        e = torch._dynamo.explain(model)(**inputs, use_cache=False)
    return Counter((str(b.reason).splitlines()[0][:40], b.user_stack[-1].filename.rsplit("/", 1)[-1])
                   for b in e.break_reasons if b.user_stack)


@pytest.fixture(scope="module")
def unpatched_breaks():
    """One model and its unpatched breaks, after a warm-up trace (a fresh model's first trace
    has one-time extra breaks), shared by the strategies below."""
    model, inputs = build_llava(seed=0), _inputs()
    _reasons(model, inputs)
    return model, inputs, _reasons(model, inputs)


@pytest.mark.skipif(not NEWEST, reason="counted on transformers 5.24 (its own breaks differ by version)")
@pytest.mark.parametrize("strategy", sorted(ADDED_BREAKS))
def test_graph_breaks_added_are_counted(strategy, unpatched_breaks):
    """The causes of the graph breaks the hooks add (dynamo's reasons, by file), after a warm-up trace."""
    model, inputs, plain = unpatched_breaks
    h = tokenprune.apply(model, strategy, budget=16)
    try:
        _reasons(model, inputs)
        added = _reasons(model, inputs) - plain
    finally:
        h.remove()
        torch._dynamo.reset()
    assert {f"{r} @ {f}": n for (r, f), n in added.items()} == ADDED_BREAKS[strategy]
    assert _reasons(model, inputs) == plain             # remove() leaves nothing dynamo sees
