"""Bad input (typed errors, model untouched), the registry, and the load-time wiring."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from conftest import single

import tokenprune
from tokenprune import AlreadyAppliedError, ConfigError, IncompatibleStrategyError, TokenPruneError, UnsupportedModelError
from tokenprune.strategies.base import Selection, StrategySpec


def snapshot(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), sorted(vars(m))) for n, m in model.named_modules()}


def assert_rejected(model, exc, match, *args, **kwargs):
    before = snapshot(model)
    with pytest.raises(exc, match=match) as info:
        tokenprune.apply(model, *args, **kwargs)
    assert isinstance(info.value, TokenPruneError)
    assert snapshot(model) == before and tokenprune.get_handle(model) is None


def test_unsupported_model_names_class_type_and_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=64))
    families = re.escape(str(sorted(tokenprune.list_families())))
    assert {"llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"} <= set(tokenprune.list_families())
    assert_rejected(m, UnsupportedModelError, r"LlamaForCausalLM.*'llama'.*" + families, "hiprune", keep=0.5)


@pytest.mark.parametrize("kw,match", [
    ({"keep": 0}, r"keep must be a number in \(0, 1\]"), ({"keep": 1.5}, r"\(0, 1\]"),
    ({"keep": -0.2}, r"\(0, 1\]"), ({"keep": math.nan}, r"\(0, 1\]"), ({"budget": 0}, r">= 1"),
    ({"budget": 2.5}, "integer"), ({"budget": 65}, r"more than the 64 visual tokens.*\[1, 64\]"),
    ({}, "exactly one of keep"), ({"keep": 0.5, "budget": 3}, "exactly one of keep"),
    ({"keep": 0.5, "positions": "weird"}, "positions must be one of"),
])
def test_bad_budgets(model, kw, match):
    assert_rejected(model, ConfigError, match, "hiprune", **kw)


def test_unknown_strategy_and_parameter(model):
    assert_rejected(model, ConfigError, r"unknown strategy 'nope'.*fastv.*hiprune", "nope", keep=0.5)
    assert_rejected(model, ConfigError, r"unknown parameter\(s\) \['alpah'\].*alpha", "hiprune", keep=0.5, alpah=0.2)
    assert_rejected(model, ConfigError, r"mode must be one of", "fopru", keep=0.5, mode="column")
    assert_rejected(model, ConfigError, r"alpha must be in", "hiprune", keep=0.5, alpha=0.0)
    assert_rejected(model, ConfigError, r"inside the config", tokenprune.HiPruneConfig(keep=0.5), alpha=0.3)


def test_layer_index_out_of_range(model):
    assert_rejected(model, ConfigError, r"layer=3 is out of range .* 3 layers; use 1..2", "fastv", keep=0.5, layer=3)
    assert_rejected(model, ConfigError, r"layer must be in \[1", "fastv", keep=0.5, layer=0)
    assert_rejected(model, ConfigError, r"object_layer=5 is out of range .* 4 layers", "hiprune", keep=0.5,
                    object_layer=5)


def test_double_apply(model):
    h = tokenprune.apply(model, "fopru", keep=0.5)
    before = snapshot(model)
    with pytest.raises(AlreadyAppliedError, match="remove"):
        tokenprune.apply(model, "hiprune", keep=0.5)
    assert snapshot(model) == before
    tokenprune.remove(model)
    assert tokenprune.get_handle(model) is None and not h.active
    with pytest.raises(ValueError, match="no tokenprune strategy"):
        tokenprune.remove(model)


def test_strategy_the_family_cannot_serve():
    """A LLaVA with a SigLIP tower has no CLS token: VisionZip ranks dominant tokens by mean received
    attention instead (asking for CLS is a clear error); with an LLM whose attention we do not know
    (here Gemma), inner-LLM strategies are refused with the list of those that fit."""
    from transformers import GemmaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from tokenprune.eval.tiny import build_llava

    cfg = build_llava().config
    cfg = copy.deepcopy(cfg)
    cfg.vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=112, patch_size=14)
    cfg.vision_feature_select_strategy = "full"
    m = LlavaForConditionalGeneration._from_config(cfg).eval()
    assert_rejected(m, ConfigError, r"dominant_score='cls' needs a vision tower with a CLS", "visionzip",
                    keep=0.5, dominant_score="cls")
    ids = torch.cat([torch.tensor([[1, 20]]), torch.full((1, 64), 4), torch.tensor([[30, 40]])], 1)
    for name in ("hiprune", "visionzip"):   # what fits works, SigLIP attention included
        with tokenprune.apply(m, name, budget=10) as h:
            with torch.no_grad():
                m(input_ids=ids, pixel_values=torch.randn(1, 3, 112, 112))
            assert h.last_stats.visual_tokens_kept == [10]
    cfg2 = copy.deepcopy(build_llava().config)
    cfg2.text_config = GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=256)
    g = LlavaForConditionalGeneration._from_config(cfg2).eval()
    assert_rejected(g, IncompatibleStrategyError, r"needs \['llm_attention'\].*fit: \[.*'hiprune'", "fastv", keep=0.5)


def test_config_object_form_and_stats(model):
    inp = single(1)
    with tokenprune.apply(model, tokenprune.HiPruneConfig(budget=16, alpha=0.5, object_layer=1)) as h:
        with torch.no_grad():
            model.generate(**inp, max_new_tokens=2, do_sample=False)
        st = h.last_stats
        assert st.visual_tokens_in == [64] and st.visual_tokens_kept == [16]
        assert st.prune_ms > 0 and 0 < st.flops_after < st.flops_before
        assert st.as_dict()["kept_indices"][0][0] == st.kept_indices[0][0].tolist()


# --- registry --------------------------------------------------------------------------------------
def test_third_party_strategy_and_duplicates(model):
    from dataclasses import dataclass

    from tokenprune.registry import _BY_CONFIG, _STRATEGIES, DuplicateRegistrationError

    @dataclass(frozen=True)
    class FirstConfig(tokenprune.PruneConfig):
        name = "first_n"

    spec = StrategySpec(name="first_n", config_cls=FirstConfig, stage="vision", needs=frozenset(),
                        requests=lambda c, i: [], select=lambda c, t, n, i: Selection(torch.arange(n)))
    tokenprune.register_strategy(spec)
    try:
        assert "first_n" in tokenprune.list_strategies()
        with pytest.raises(DuplicateRegistrationError):
            tokenprune.register_strategy(spec)
        with tokenprune.apply(model, "first_n", budget=5) as h:
            with torch.no_grad():
                model(**single(1))
            assert h.last_stats.kept_indices[0][0].tolist() == [0, 1, 2, 3, 4]
    finally:
        del _STRATEGIES["first_n"], _BY_CONFIG[FirstConfig]
    with pytest.raises(DuplicateRegistrationError):
        tokenprune.register_family("llava", object)
    # the built-ins are all there (a plugin family may add more; the list is sorted)
    fams = tokenprune.list_families()
    assert {"llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"} <= set(fams)
    assert fams == sorted(fams)


# --- load ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    from tokenprune.eval.tiny import build_llava, build_processor

    path = tmp_path_factory.mktemp("tiny-llava")
    build_processor().save_pretrained(path)
    m = build_llava()
    m.config.image_token_id = build_processor().tokenizer.convert_tokens_to_ids("<image>")
    m.save_pretrained(path)
    return path


def test_load_applies_strategy_on_a_saved_checkpoint(saved_dir):
    from PIL import Image

    model, processor, handle = tokenprune.load(str(saved_dir), strategy="fopru", keep=0.25, mode="row")
    assert isinstance(handle.config, tokenprune.FoPruConfig) and handle.config.mode == "row"
    img = Image.new("RGB", (150, 120), (200, 30, 30))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=img, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert handle.last_stats.visual_tokens_kept == [16]
    kept = handle.last_stats.kept_indices[0][0]
    assert (kept // 8).unique().numel() == 2  # row mode: two whole rows of the 8x8 grid
    model2, _, none = tokenprune.load(str(saved_dir))
    assert none is None and tokenprune.get_handle(model2) is None


def test_load_validates_before_loading(saved_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown parameter"):
        tokenprune.load(str(saved_dir), strategy="fopru", keep=0.25, colour="red")
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="model_type 'llama'"):
        tokenprune.load(str(tmp_path), strategy="fopru", keep=0.25)
