"""The conformance kit run on the example plugins as a third party would (not collected by the
project's own run: tests/test_plugins.py installs the package and runs this file in a subprocess).
"""
from __future__ import annotations

import copy

import torch

import tokenprune
from tokenprune.eval.tiny import llava_config
from tokenprune.testing import ConformanceSuite, FamilyCase, builtin_cases


def build_vipllava(dtype: torch.dtype = torch.float32):
    """A random tiny ``VipLlavaForConditionalGeneration`` (CLIP tower, Llama LLM, 2 feature layers)."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    base = llava_config()
    cfg = VipLlavaConfig(vision_config=copy.deepcopy(base.vision_config), text_config=copy.deepcopy(base.text_config),
                         image_token_id=4, pad_token_id=0)
    for key in ("vision_feature_layer", "vision_feature_layers"):   # the name changed in 5.2x
        if hasattr(cfg, key):
            setattr(cfg, key, [-2, 2])
    torch.manual_seed(0)
    return VipLlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()


def vip_inputs(seed: int):
    from tokenprune.eval.tiny import prompt_ids

    ids = prompt_ids(64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 112, 112, generator=g)}


VIP = FamilyCase("vipllava", build=build_vipllava, inputs=vip_inputs, suppress=(4,))


def test_the_plugins_were_found_through_entry_points():
    assert {"norm_prune", "inverse_fastv"} <= set(tokenprune.list_strategies())
    assert "vipllava" in tokenprune.list_families() and not tokenprune.plugin_errors()


class TestScratchPlugins(ConformanceSuite):
    cases = [VIP, builtin_cases()[0]]          # the scratch family and LLaVA-1.5
    strategies = ["norm_prune", "inverse_fastv", "hiprune"]
