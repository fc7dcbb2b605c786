"""tokenprune inside vLLM on Qwen2.5-VL (a tiny random model of the real class, saved with its real
processor): kept indices and greedy tokens equal tokenprune under transformers with the original
M-RoPE positions (kept tokens keep theirs, the text after an image keeps its unpruned ones), for
wide, square and tall images, one at a time and in one continuous batch."""
from __future__ import annotations

import pytest
from engines import CASES, close, engine, generate, hf_reference, kept, request
from PIL import Image

import eval.tiny as tiny

#: one budget for every image (the tall one has 8 x 3 = 24 tokens, the others up to 64)
PARAMS = {"budget": 8}


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    """The checkpoint (vLLM's CPU attention needs head_dim >= 32) and the cases, a tall image added."""
    out = tmp_path_factory.mktemp("qwen25")
    model = tiny.build_qwen("qwen2_5_vl", seed=0, vision_hidden=64, vision_heads=2, llm_hidden=128, llm_heads=4,
                            llm_kv_heads=2)
    model.save_pretrained(out)
    tiny.build_qwen_processor("qwen2_5_vl").save_pretrained(out)
    tall = out / "tall.png"
    tiny.random_image(224, 84, seed=3).save(tall)
    assert Image.open(tall).size == (84, 224)
    return out, CASES + [(tall, "what is this", "")]


def run(model, cases, config):
    from tokenprune.vllm.qwen import open_cpu_runner

    llm = engine(model, config, max_model_len=1024)
    try:
        if config is not None:
            assert llm.collective_rpc(open_cpu_runner) == [True]
        reqs = [request(i, q, model) for i, q, _ in cases]
        seq = [generate(llm, [r], max_tokens=6)[0] for r in reqs]
        seq_kept = kept(llm)
        together = generate(llm, reqs, max_tokens=6)
        together_kept = kept(llm)
    finally:
        close(llm)
    assert together == seq
    assert sorted(together_kept) == sorted(seq_kept)
    return seq, seq_kept


def test_unpruned_equals_transformers(qwen25):
    model, cases = qwen25
    ids, idx = run(model, cases, None)
    assert idx == []
    for (image, question, _), got in zip(cases, ids):
        assert got == hf_reference(model, None, {}, image, question, max_tokens=6)[0]


@pytest.mark.parametrize("strategy", ["hiprune", "visionzip", "pool", "random"])
def test_same_selection_and_tokens_as_transformers(qwen25, strategy):
    model, cases = qwen25
    ids, idx = run(model, cases, {"strategy": strategy, **PARAMS})
    assert len(idx) == len(cases)
    for (image, question, _), got, k in zip(cases, ids, idx):
        ref_ids, ref_idx = hf_reference(model, strategy, PARAMS, image, question, max_tokens=6)
        assert len(k) == PARAMS["budget"]
        assert k == ref_idx[0], f"{strategy} on {image.name}: kept indices differ from transformers"
        assert got == ref_ids, f"{strategy} on {image.name}: greedy tokens differ from transformers"


@pytest.mark.parametrize("bad, message", [
    ({"strategy": "hiprune", "budget": 8, "positions": "compact"}, "positions='original'"),
    ({"strategy": "fastv", "keep": 0.5}, "inside the LLM"),
])
def test_bad_configuration_fails_at_start_up(qwen25, bad, message):
    from vllm import LLM

    with pytest.raises(Exception) as err:
        LLM(str(qwen25[0]), dtype="float32", max_model_len=1024, enforce_eager=True, hf_overrides={"tokenprune": bad})
    assert message in str(err.value)
