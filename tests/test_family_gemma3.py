"""Gemma 3 (``Gemma3ForConditionalGeneration``): the conformance kit, and references of what is Gemma
3's own, built independently of the engine — scores pooled over the projector's average-pool windows
(eager SigLIP attention), the LLM's per-layer-type masks (bidirectional image blocks from
``token_type_ids``, sliding windows) for the kept tokens, pan-and-scan crops as images of their own.

The kit runs twice: on the processor's output without ``token_type_ids`` (the kit as it is), and with
them (:class:`TestKitTokenTypes`), where the kit's two references that rebuild the language model's
call — the hand-fed logits and the second turn's conversation — are given the token types (sliced
by hand, padded for the new turn); the beam ideal, which Gemma 3's ``generate`` cannot be fed
through ``inputs_embeds``, is checked here with the kept placeholders and their features.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch

import tokenprune
from tokenprune.errors import IncompatibleStrategyError, UnsupportedModelError
from tokenprune.testing import ConformanceSuite, LMInputs, generate, keep_mask

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3ForConditionalGeneration"):   # pragma: no cover - the classes' own absence
    pytest.skip("this transformers has no Gemma3ForConditionalGeneration", allow_module_level=True)

from tokenprune.eval import tiny_gemma3 as tg  # noqa: E402
from tokenprune.patches.llava import vision_encoder_layers  # noqa: E402

ALL = [s for s in tokenprune.list_strategies() if s != "holitom"]
SPECS = {s: tokenprune.registry.get_strategy(s) for s in ALL}
VISION = [s for s in ALL if SPECS[s].stage == "vision" and SPECS[s].needs <= {"features", "mean_attention", "keys"}]
INNER = [s for s in ALL if SPECS[s].stage == "llm"]
#: vision strategies that read encoder attention (their scores are pooled by the family)
SCORED = [s for s in VISION if SPECS[s].needs & {"mean_attention", "keys"}]
KEEP = 0.3
G = 4                # tokens a side of one image (16 tokens; 8 x 8 patches at 112 px)


# the whole kit on this family: in the slow suite (CI runs it on the newest transformers)
@pytest.mark.slow
class TestKit(ConformanceSuite):
    cases = [tg.case()]
    strategies = ALL + [("visionzip", {}, ("fastv", {"keep": 0.5}))]


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def hand_fed(clean: Any, inp: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """Logits of the *unpatched* model fed only the ``keep`` [L] tokens of row 0: its own LLM-input
    embeddings of them, their original positions and their ``token_type_ids``, sliced here; the
    model builds its masks (image blocks, sliding windows) from those itself."""
    cap = LMInputs(clean)
    clean(**inp)
    embeds = cap.close()["inputs_embeds"][:, keep]
    kw: dict[str, Any] = {"inputs_embeds": embeds, "position_ids": torch.nonzero(keep).flatten()[None],
                          "attention_mask": torch.ones(1, embeds.shape[1], dtype=torch.long), "use_cache": False}
    if "token_type_ids" in inp:
        kw["token_type_ids"] = inp["token_type_ids"][:, keep]
    return clean.lm_head(clean.model(**kw).last_hidden_state)


def merged(h: Any) -> bool:
    groups = h.last_stats.merge_groups
    return bool(groups) and any(g is not None for row in groups for g in row)


def runs(ids_row: torch.Tensor) -> list[torch.Tensor]:
    """Columns of each image's placeholder run in one row (16 each, in order)."""
    cols = torch.nonzero(ids_row == tg.IDS["image"]).flatten()
    return list(cols.split(tg.TOKENS))


def row_keep(inp: dict[str, Any], kept: list[list[torch.Tensor]]) -> torch.Tensor:
    """[B, L] bool: text and every row's kept placeholder tokens (``last_stats.kept_indices``)."""
    ids = inp["input_ids"]
    keep = ids != tg.IDS["image"]
    for r in range(ids.shape[0]):
        for run, k in zip(runs(ids[r]), kept[r]):
            keep[r, run[k]] = True
    return keep


def masks_by_hand(types: torch.Tensor, valid: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, L] bool full-attention and sliding-window masks of a sequence: a query sees the valid
    keys at or before it, and every key of its own image block (a contiguous run of type 1); sliding
    layers only the keys fewer than ``window`` tokens back (or ahead, in the block)."""
    b, n = types.shape
    img = types == 1
    start = img & ~torch.nn.functional.pad(img, (1, 0))[:, :-1]
    block = torch.where(img, torch.cumsum(start.long(), 1), torch.zeros_like(types) - 1)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    full = valid[:, None, :].bool() & ((k <= q)[None] | same)
    return full, full & (k > q - window)[None]


@torch.no_grad()
def eager_scores(clean: Any, pixel_values: torch.Tensor, requests: list[Any]) -> dict[tuple[int, str], torch.Tensor]:
    """Per-token scores of each request from an eager copy of the tower (``output_attentions``) and its
    key projections, pooled by hand over k x k windows (k = patches / tokens a side): [n_img, G*G] /
    [n_img, G*G, d]."""
    m = copy.deepcopy(clean)
    tower = m.model.vision_tower
    tower.set_attn_implementation("eager")
    layers = vision_encoder_layers(tower)
    keys: dict[int, torch.Tensor] = {}
    hooks = [layers[r.layer].self_attn.k_proj.register_forward_hook(
        lambda mod, a, o, i=r.layer: keys.setdefault(i, o)) for r in requests if r.kind == "keys"]
    att = tower(pixel_values=pixel_values, output_attentions=True).attentions
    for hk in hooks:
        hk.remove()
    vcfg = clean.config.vision_config
    n, heads, p = pixel_values.shape[0], vcfg.num_attention_heads, vcfg.image_size // vcfg.patch_size
    k = p // int(clean.config.mm_tokens_per_image ** 0.5)
    out = {}
    for r in requests:
        if r.kind == "mean":
            per_patch = att[r.layer].float().mean(dim=(1, 2))[:, None]                  # [n, 1, p*p]
        else:
            per_patch = keys[r.layer].reshape(n, p * p, heads, -1).float().mean(2).transpose(1, 2)
        pooled = torch.nn.functional.avg_pool2d(per_patch.reshape(n, -1, p, p), k).flatten(2).transpose(1, 2)
        out[(r.layer, r.kind)] = pooled[..., 0] if r.kind == "mean" else pooled
    return out


@pytest.fixture(scope="module")
def base():
    return tg.build()


@pytest.fixture()
def gm(base):
    return copy.deepcopy(base)


# ----------------------------------------------------------------------------------------------
# the kit with token_type_ids (bidirectional image blocks)
# ----------------------------------------------------------------------------------------------

# the whole kit on this family: in the slow suite (CI runs it on the newest transformers)
@pytest.mark.slow
class TestKitTokenTypes(ConformanceSuite):
    """The kit on the processor's full output; its references that rebuild the language model's call
    carry the token types (the rest of the kit is unchanged)."""

    cases = [tg.case(token_types=True)]
    strategies = ALL + [("visionzip", {}, ("fastv", {"keep": 0.5}))]

    def test_pruned_equals_hand_fed_kept_tokens(self, combo: Any) -> None:
        case, name, params, inner, model = self.setup_combo(combo)
        if SPECS[name].stage != "vision" or inner is not None:
            pytest.skip("inner-LLM stages are refused for Gemma 3")
        clean = copy.deepcopy(model)
        inp = case.inputs(0)
        h = self.apply(model, name, params, inner)
        with torch.no_grad():
            out = model(**inp).logits
        if merged(h):
            pytest.skip(f"{name} merges features into the kept tokens")
        ref = hand_fed(clean, inp, keep_mask(clean, inp, h.last_stats.kept_indices[0]))
        torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-5)

    def _first_turn(self, model: Any, inp: dict[str, Any], case: Any):
        """The kit's first turn, the conversation's ``token_type_ids`` padded with text (0) for the
        answer and the new turn, as the processor would give them."""
        cache, full, reuse, n_new = super()._first_turn(model, inp, case)
        n = full["input_ids"].shape[1]
        pad = torch.zeros(1, n - inp["token_type_ids"].shape[1], dtype=torch.long)
        types = torch.cat([inp["token_type_ids"], pad], 1)
        full["token_type_ids"] = types
        reuse["token_type_ids"] = types
        return cache, full, reuse, n_new


# ----------------------------------------------------------------------------------------------
# family-specific references
# ----------------------------------------------------------------------------------------------

def test_family_facts(gm):
    fam = tokenprune.api.family_for(gm)
    assert fam.name == "gemma3" and fam.select_on_output and fam.num_prefix == 0
    assert fam.vision_info.grid == (G, G) and not fam.vision_info.has_cls
    assert fam.vision_info.feature_layer == gm.config.vision_config.num_hidden_layers - 1
    assert fam.tokens_per_image == gm.config.mm_tokens_per_image == G * G
    assert fam.provides == {"features", "mean_attention", "keys"}
    assert tokenprune.api.strategies_for(gm) == VISION


@pytest.fixture(scope="module")
def wide_pool():
    """224 px images: 16 x 16 patches pooled 4 x 4 into the same 4 x 4 tokens."""
    return tg.build(image_size=224)


@pytest.mark.parametrize("name", SCORED)
@pytest.mark.parametrize("which", ["one", "pan_and_scan", "pool4"])
def test_selection_is_the_strategy_on_eager_scores_pooled_like_the_features(gm, wide_pool, name, which):
    """Every image (pan-and-scan: the thumbnail and each crop) keeps what the strategy picks from its
    own eager attention / keys averaged over the projector's windows (2 x 2, or 4 x 4 for 224 px),
    with the projector's output as features."""
    if which == "pool4":
        gm = copy.deepcopy(wide_pool)
        inp = dict(tg.inputs(0), pixel_values=torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5)))
    else:
        inp = tg.inputs(0) if which == "one" else tg.pan_and_scan_inputs(0)
    clean = copy.deepcopy(gm)
    h = tokenprune.apply(gm, name, keep=KEEP)
    with torch.no_grad():
        gm(**inp)
    kept = h.last_stats.kept_indices[0]
    n_img = inp["pixel_values"].shape[0]
    assert len(kept) == n_img == (4 if which == "pan_and_scan" else 1)
    spec, cfg = tokenprune.registry.make_config(name, {"keep": KEEP})
    info = tokenprune.strategies.base.VisionInfo(num_layers=3, feature_layer=2, grid=(G, G), has_cls=False)
    assert h.family.vision_info == info
    requests = spec.requests(cfg, info)
    scores = eager_scores(clean, inp["pixel_values"], requests)
    with torch.no_grad():
        feats = clean.model.get_image_features(inp["pixel_values"], return_dict=True).pooler_output
    n_keep = cfg.tokens_for(G * G)
    for i in range(n_img):
        tokens = tokenprune.strategies.base.VisualTokens(grid=(G, G), features=feats[i],
                                                         scores={key: v[i] for key, v in scores.items()})
        want = torch.sort(spec.select(cfg, tokens, n_keep, info).indices).values
        assert torch.equal(kept[i], want.cpu()), (i, kept[i], want)


@pytest.mark.parametrize("name", [s for s in VISION if s not in ("pool", "prumerge", "visionzip")])
@pytest.mark.parametrize("which", ["one", "pan_and_scan", "no_token_types"])
def test_pruned_equals_unpatched_fed_the_kept_tokens_and_their_token_types(gm, name, which):
    """Logits == the unpatched model fed the kept tokens with their token types sliced by hand; the
    pan-and-scan prompt (97 tokens, 53 kept) is longer than the sliding window (32), so the
    windows count the kept sequence. Without the token types the reference differs (the blocks
    matter); without them in the call, it is the causal model fed the kept tokens."""
    clean = copy.deepcopy(gm)
    inp = {"one": lambda: tg.inputs(0), "pan_and_scan": lambda: tg.pan_and_scan_inputs(0),
           "no_token_types": lambda: tg.inputs(0, token_types=False)}[which]()
    h = tokenprune.apply(gm, name, keep=KEEP)
    with torch.no_grad():
        out = gm(**inp).logits
    keep = keep_mask(clean, inp, h.last_stats.kept_indices[0])
    ref = hand_fed(clean, inp, keep)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-5)
    if which != "no_token_types":
        causal = hand_fed(clean, {k: v for k, v in inp.items() if k != "token_type_ids"}, keep)
        assert not torch.allclose(out, causal, atol=1e-3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llm_masks_after_the_cut_are_the_blocks_and_windows_of_the_kept_tokens(attn):
    """What the pruned language model gets, checked against masks written by hand: for a padded batch
    (two rows, three images) and a pan-and-scan prompt, with a sliding window (8) shorter than an
    image's run, every layer type's mask is the kept tokens' causal + image-block mask (and the
    window, counted in the kept sequence); positions are the kept tokens' original ones."""
    model = tg.build(sliding_window=8, attn_implementation=attn)
    batch, _ = tg.batch()
    for inp in (batch, tg.pan_and_scan_inputs(1)):
        h = tokenprune.apply(model, "hiprune", keep=KEEP)
        cap = LMInputs(model)
        with torch.no_grad():
            model(**inp)
        got = cap.close()
        keep = row_keep(inp, h.last_stats.kept_indices)
        h.remove()
        b, width = keep.shape[0], int(keep.sum(1).max())
        idx = torch.full((b, width), -1)
        for r in range(b):
            cols = torch.nonzero(keep[r]).flatten()
            idx[r, width - cols.numel():] = cols
        valid = (idx >= 0) & inp["attention_mask"].gather(1, idx.clamp(min=0)).bool()
        types = torch.where(idx >= 0, inp["token_type_ids"].gather(1, idx.clamp(min=0)), 0)
        full, sliding = masks_by_hand(types, valid, 8)
        assert isinstance(got["attention_mask"], dict)
        for kind, want in (("full_attention", full), ("sliding_attention", sliding)):
            m = got["attention_mask"][kind][:, 0]
            m = m if m.dtype == torch.bool else m == 0
            assert m.shape == (b, width, width)
            assert torch.equal(m[valid], want[valid]), kind      # rows of real tokens (padding rows aside)
        assert torch.equal(got["position_ids"][valid], idx[valid])
        assert got["inputs_embeds"].shape[:2] == (b, width)


def test_padded_batch_with_token_types_equals_rows_alone():
    """Rows of different lengths and image counts (new left padding after the cut), with a sliding
    window shorter than the rows: logits of every row's last token and the kept sets match the rows
    alone."""
    model = tg.build(sliding_window=12)
    batch, rows = tg.batch()
    h = tokenprune.apply(model, "vispruner", keep=KEEP)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(**batch, position_ids=pos).logits
    st = h.last_stats
    for r, row in enumerate(rows):
        with torch.no_grad():
            o = model(**row).logits
        torch.testing.assert_close(out[r, -1], o[0, -1], atol=5e-5, rtol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(st.kept_indices[r], h.last_stats.kept_indices[0]))


@pytest.mark.parametrize("name", ["hiprune", "visionzip"])
def test_cached_equals_uncached_past_the_sliding_window(name):
    """A pan-and-scan prompt far longer than the window (8): decode steps (the cache's sliding layers
    keep the last kept tokens; the model builds their masks) continue the prefill's masks exactly —
    the same tokens and scores as re-running the whole pruned sequence at every step."""
    model = tg.build(sliding_window=8)
    inp = tg.pan_and_scan_inputs(3)
    case = tg.case(token_types=True)
    tokenprune.apply(model, name, keep=KEEP)
    kw = {"return_dict_in_generate": True, "output_scores": True}
    a = generate(model, inp, case, **kw)
    b = generate(model, inp, case, use_cache=False, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=3e-5, rtol=1e-5)


def test_pan_and_scan_crops_are_images_with_their_own_budget(gm):
    inp = tg.pan_and_scan_inputs(2)
    assert inp["pixel_values"].shape[0] == 4 and len(runs(inp["input_ids"][0])) == 4
    h = tokenprune.apply(gm, "visionzip", budget=5)
    out = generate(gm, inp, tg.case(token_types=True))
    st = h.last_stats
    assert st.visual_tokens_in == [64] and st.visual_tokens_kept == [20]
    assert [k.numel() for k in st.kept_indices[0]] == [5] * 4
    assert out.shape[1] == inp["input_ids"].shape[1] + 4


@pytest.mark.parametrize("name", ["hiprune", "divprune", "random"])
@pytest.mark.parametrize("mode", [{}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}],
                         ids=["greedy", "beam3", "return2"])
def test_generation_equals_unpatched_fed_the_kept_tokens(gm, name, mode):
    """Greedy and beam search (tokens, every step's scores) == the unpatched model's generate fed the
    kept placeholders, their own image features (the projector's rows of the kept tokens: a hook of
    this test's on the unpatched projector), the kept token types and the original positions."""
    clean = copy.deepcopy(gm)
    inp = tg.inputs(4)
    case = tg.case(token_types=True)
    h = tokenprune.apply(gm, name, keep=KEEP)
    dict_out = {"return_dict_in_generate": True, "output_scores": True}
    got = generate(gm, inp, case, **mode, **dict_out)
    (kept,) = h.last_stats.kept_indices[0]
    keep = keep_mask(clean, inp, [kept])
    hook = clean.model.multi_modal_projector.register_forward_hook(lambda mod, a, out: out[:, kept])
    try:
        ids = inp["input_ids"][:, keep]
        ideal = generate(clean, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                 "pixel_values": inp["pixel_values"], "token_type_ids": inp["token_type_ids"][:, keep],
                                 "position_ids": torch.nonzero(keep).flatten()[None]}, case, **mode, **dict_out)
    finally:
        hook.remove()
    assert torch.equal(got.sequences[:, -4:], ideal.sequences[:, -4:])
    if mode:       # the beams' final scores
        torch.testing.assert_close(got.sequences_scores, ideal.sequences_scores, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.scores, ideal.scores):      # every step's scores, not only the argmax
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5)


def test_inner_llm_strategies_are_refused_typed(gm):
    for name in INNER:
        with pytest.raises(IncompatibleStrategyError, match="llm_attention"):
            tokenprune.apply(gm, name, keep=KEEP)
    with pytest.raises(IncompatibleStrategyError, match="llm_attention"):
        tokenprune.apply(gm, "visionzip", inner=("fastv", {"keep": 0.5}), keep=KEEP)
    with pytest.raises(IncompatibleStrategyError, match="video"):
        tokenprune.apply(gm, "evs", keep=KEEP)
    with pytest.raises(UnsupportedModelError, match="inner-LLM"):
        tokenprune.api.family_for(gm).llm_attention(1)
    assert tokenprune.get_handle(gm) is None


def test_cls_scores_are_refused_without_a_cls_token(gm):
    """No CLS token in SigLIP: an explicit CLS score is refused (typed), "auto" means the mean."""
    with pytest.raises(tokenprune.errors.ConfigError, match="CLS"):
        tokenprune.apply(gm, "visionzip", keep=KEEP, dominant_score="cls")
    with pytest.raises(IncompatibleStrategyError, match="CLS"):
        tokenprune.apply(gm, "prumerge", keep=KEEP, score="cls")
    assert tokenprune.get_handle(gm) is None
    h = tokenprune.apply(gm, "visionzip", keep=KEEP)
    assert {kind for _, kind in (r for r in [(q.layer, q.kind) for q in h.requests])} <= {"mean", "keys"}


def test_flex_attention_and_bidirectional_text_are_refused(gm):
    flex = copy.deepcopy(gm)
    flex.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="flex"):
        tokenprune.apply(flex, "hiprune", keep=KEEP)
    bi = copy.deepcopy(gm)
    bi.config.text_config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        tokenprune.apply(bi, "hiprune", keep=KEEP)


def test_text_only_call_and_image_token_types_without_pixels_pass_through(gm):
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        ref = gm(input_ids=ids).logits
    with tokenprune.apply(gm, "hiprune", keep=KEEP):
        with torch.no_grad():
            assert torch.equal(gm(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits, ref)


def test_load_a_saved_folder_and_run_the_real_processor(tmp_path):
    tg.save(tmp_path)
    model, proc, h = tokenprune.load(str(tmp_path), "hiprune", keep=0.25)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration" and type(proc).__name__ == "Gemma3Processor"
    assert h.family.name == "gemma3"
    for kw in ({}, tg.PAN_AND_SCAN):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]
        enc = proc(text=proc.apply_chat_template(msgs, add_generation_prompt=True), images=tg.random_image(60, 180, 1),
                   return_tensors="pt", **kw)
        enc.pop("num_crops", None)
        n_img = enc["pixel_values"].shape[0]
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == enc["input_ids"].shape[1] + 3
        assert h.last_stats.visual_tokens_in == [16 * n_img] and h.last_stats.visual_tokens_kept == [4 * n_img]


def test_cli_run_reports_kept_counts(tmp_path, capsys):
    from PIL import Image

    from tokenprune.cli import main

    tg.save(tmp_path / "m")
    img, png = tmp_path / "in.png", tmp_path / "o.png"
    Image.new("RGB", (150, 100), (40, 90, 200)).save(img)
    assert main(["run", "--model", str(tmp_path / "m"), "--image", str(img), "--strategy", "hiprune",
                 "--keep", "0.25", "--json", "--overlay", str(png)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["visual_tokens_in"] == 16 and report["visual_tokens_kept"] == 4
    assert len(report["kept_indices"][0]) == 4
    with Image.open(png) as im:      # the 4 x 4 token grid over the whole image, enlarged under a title
        assert im.format == "PNG" and im.width % 150 == 0 and im.height > im.width * 100 // 150
