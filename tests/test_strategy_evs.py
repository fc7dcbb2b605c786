"""EVS (``evs``): the selection rule against a hand-worked example and against a plain
re-implementation of vLLM's ``compute_retention_mask`` / ``compute_retained_tokens_count`` written
here from reading them (first frame at a constant sentinel, ``1 - cosine`` to the previous frame,
stable descending order over the frame-major flat vector, ``max(P, int(N * (1 - q)))`` kept), and
on the real video families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision) from independently
recorded LLM-space video tokens, with the hand-fed unpatched model as the logits reference."""
from __future__ import annotations

import copy

import pytest
import torch

import tokenprune
from tokenprune.strategies.base import VisualTokens
from tokenprune.strategies.evs import SPEC, EVSConfig, evs_dissimilarity, evs_select, vllm_retained_count

# ----------------------------------------------------------------------------------------------
# the vLLM reference, re-implemented plainly (Python lists, no shared code with the strategy)
# ----------------------------------------------------------------------------------------------

def vllm_count(tokens_per_frame: int, frames: int, q: float) -> int:
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - q)))


def vllm_keep(emb: torch.Tensor, thw: tuple[int, int, int], q: float, n_keep: int | None = None) -> list[int]:
    """Kept flat indices (ascending) of a video [T*H*W, D] (merge size 1) by vLLM's rule."""
    t, h, w = thw
    grid = emb.reshape(t, h, w, emb.shape[-1])
    sim = torch.nn.functional.cosine_similarity(grid[1:], grid[:-1], dim=-1)      # [T-1, H, W]
    # vLLM's arithmetic stays in the embeddings' dtype; the values are compared exactly as floats
    values = [255.0] * (h * w) + (1 - sim).flatten().float().tolist()
    n = vllm_count(h * w, t, q) if n_keep is None else n_keep
    # a stable descending sort: equal values keep their index order
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:n])


def ours(x: torch.Tensor, frames: int, grid: tuple[int, int], n_keep: int) -> list[int]:
    tok = VisualTokens(grid=grid, features=x, frames=frames)
    return SPEC.select(EVSConfig(budget=n_keep), tok, n_keep, None).indices.tolist()


def quantised_video(t: int, p: int, d: int, seed: int, dtype=torch.float32, static: float = 0.5) -> torch.Tensor:
    """[t*p, d] small-integer features: frames repeat positions often (exact ties of 0), several
    changed positions share a dissimilarity (exact ties between frames), and the first frame too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (t, p, d), generator=g).float()
    for f in range(1, t):
        same = torch.rand(p, generator=g) < static
        x[f, same] = x[f - 1, same]
    x[t - 1, : p // 2] = x[0, : p // 2]              # repeats of an earlier, not the previous, frame
    return x.reshape(t * p, d).to(dtype)


# ----------------------------------------------------------------------------------------------
# the rule
# ----------------------------------------------------------------------------------------------

def test_hand_worked_example():
    """3 frames x 2 positions: d = [inf, inf | 0, 1 | 2, 0] -> order 0, 1, 4, 3, then 2 before 5."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = torch.stack([a, b,      # frame 0
                     a, a,      # frame 1: position 0 unchanged (d=0), position 1 turned 90 deg (d=1)
                     -a, a])    # frame 2: position 0 reversed (d=2), position 1 unchanged (d=0)
    d = evs_dissimilarity(x.reshape(3, 2, 2))
    assert torch.isinf(d[:2]).all() and torch.allclose(d[2:], torch.tensor([0.0, 1.0, 2.0, 0.0]))
    want = {1: [0], 2: [0, 1], 3: [0, 1, 4], 4: [0, 1, 3, 4], 5: [0, 1, 2, 3, 4], 6: [0, 1, 2, 3, 4, 5]}
    for n, idx in want.items():
        assert ours(x, 3, (1, 2), n) == idx
        assert vllm_keep(x, (3, 1, 2), 0.0, n_keep=n) == idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.7, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("thw", [(4, 3, 4), (8, 2, 3), (2, 4, 4), (1, 3, 3)])
def test_parity_with_vllm_rule_at_vllm_count(thw, q, dtype):
    """budget = vLLM's count -> exactly vLLM's kept set, with many exact ties (quantised features)
    and random ones, in float32 and bfloat16 (the rule's arithmetic in the features' dtype)."""
    t, h, w = thw
    for seed in range(3):
        for x in (quantised_video(t, h * w, 6, seed, dtype), torch.randn(t * h * w, 6,
                  generator=torch.Generator().manual_seed(seed)).to(dtype)):
            n = vllm_retained_count(h * w, t, q)
            assert n == vllm_count(h * w, t, q)
            got = ours(x, t, (h, w), n)
            assert got == vllm_keep(x, thw, q)
            assert got[: h * w] == list(range(h * w))            # the first frame is kept whole


@pytest.mark.parametrize("n_keep", [1, 5, 12, 13, 30, 47, 48])
def test_parity_at_every_budget(n_keep):
    """Any budget: vLLM's order cut at n_keep (below one frame: frame 0's first tokens in raster order)."""
    x = quantised_video(4, 12, 5, seed=3)
    assert ours(x, 4, (3, 4), n_keep) == vllm_keep(x, (4, 3, 4), 0.0, n_keep=n_keep)
    if n_keep < 12:
        assert ours(x, 4, (3, 4), n_keep) == list(range(n_keep))


def test_count_rule_against_keep():
    """vLLM floors and never keeps less than a frame; ``keep = 1 - q`` rounds (documented)."""
    assert vllm_retained_count(48, 4, 0.999) == 48
    assert vllm_retained_count(48, 4, 0.0) == 192
    assert vllm_retained_count(10, 7, 0.75) == 17                  # int(17.5)
    assert EVSConfig(keep=0.25).tokens_for(70) == 18               # round(17.5) = 18 (half to even)
    for p, f in [(16, 4), (49, 8), (196, 32), (7, 3)]:
        for q in [0.1, 0.3, 0.5, 0.7, 0.75, 0.9]:
            v = vllm_retained_count(p, f, q)
            o = EVSConfig(keep=1 - q).tokens_for(p * f)
            assert abs(v - o) <= 1 or (v == p and o < p)
    with pytest.raises(ValueError):
        vllm_retained_count(4, 2, 1.0)


def test_exact_budget_ascending_unique_deterministic():
    x = torch.randn(5 * 9, 8, generator=torch.Generator().manual_seed(1))
    for n in range(1, 46):
        a = SPEC.select(EVSConfig(budget=n), VisualTokens((3, 3), x, frames=5), n, None).indices
        b = SPEC.select(EVSConfig(budget=n), VisualTokens((3, 3), x.clone(), frames=5), n, None).indices
        assert a.numel() == n and torch.equal(a, b) and torch.equal(a, torch.unique(a))
        assert a.dtype == torch.long
    assert evs_select(x.reshape(5, 9, 8), 45).tolist() == list(range(45))
    assert evs_select(x.reshape(5, 9, 8), 1).tolist() == [0]


def test_one_frame_video_keeps_the_first_tokens():
    x = torch.randn(12, 4)
    assert ours(x, 1, (3, 4), 5) == [0, 1, 2, 3, 4]


def test_static_video_keeps_the_first_frame_and_moving_tokens():
    """A static video where frame f (1..3) changes position f and restores position f-1: the
    tokens that differ from the previous frame are 10, 19, 20, 29, 30 (flat), exactly those kept."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(9, 8, generator=g)
    frames = [base]
    for f in range(1, 4):
        fr = base.clone()
        fr[f] = torch.randn(8, generator=g)
        frames.append(fr)
    got = ours(torch.cat(frames), 4, (3, 3), 9 + 5)
    assert got == list(range(9)) + [10, 19, 20, 29, 30]


def test_batch_equals_one_by_one():
    xs = torch.stack([quantised_video(3, 6, 4, seed=s) for s in range(4)])     # [B, F*P, D]
    for frames in (1, 3):
        grid = (2, 3) if frames == 3 else (3, 6)
        for n in (1, 4, 7, 18):
            batched = SPEC.select_batch(EVSConfig(budget=n), VisualTokens(grid, xs, frames=frames), n, None)
            for x, sel in zip(xs, batched):
                assert torch.equal(sel.indices, SPEC.select(EVSConfig(budget=n), VisualTokens(grid, x, frames=frames),
                                                            n, None).indices)


def test_spec_and_config():
    assert SPEC.unit == "video" and SPEC.images == "keep" and SPEC.stage == "vision"
    assert {"video", "features"} <= SPEC.needs and SPEC.requests(EVSConfig(keep=0.5), None) == []
    assert EVSConfig.param_names() == ["keep", "budget", "positions"]
    with pytest.raises(tokenprune.ConfigError):
        EVSConfig()


# ----------------------------------------------------------------------------------------------
# the real video families
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_video_equals_vllm_rule_and_hand_fed(kind):
    """4 temporal groups of 4 x 4 merged tokens, nearly static: kept set == vLLM's rule on the
    recorded merger output (raster) at vLLM's count; the image passes whole; logits == hand-fed."""
    from test_holitom_video import video_inputs
    from test_qwen import hand_fed, recorded_vision

    from tokenprune.eval.tiny import build_qwen

    model = build_qwen(kind)
    clean = copy.deepcopy(model)
    # the image (36 tokens) is larger than the video budget: the engine still sizes a budget for
    # images it then passes whole, and a budget above an image's tokens is refused there
    inp = video_inputs(kind, images=[(12, 12)], videos=[(4, 8, 8)])
    q = 0.6
    n = vllm_retained_count(16, 4, q)                                   # 25
    _, feats = recorded_vision(clean, inp)
    video = feats[1][0]                                                 # [64, D] raster, frame-major
    want = vllm_keep(video, (4, 4, 4), q)
    assert len(want) == n
    with tokenprune.apply(model, "evs", budget=n) as h:
        with torch.no_grad():
            out = model(**inp).logits
        img, vid = h.last_stats.kept_indices[0]
        assert img.tolist() == list(range(36))
        assert vid.tolist() == want
        assert vid[:16].tolist() == list(range(16))
    ref = hand_fed(clean, inp, [img, vid])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # keep = 1 - q: round(0.4 * 64) = 26 tokens, vLLM's order cut there
    with tokenprune.apply(model, "evs", keep=1 - q) as h:
        with torch.no_grad():
            model(**inp)
        assert h.last_stats.kept_indices[0][1].tolist() == vllm_keep(video, (4, 4, 4), q, n_keep=26)


def test_onevision_video_equals_vllm_rule_and_hand_fed():
    """OneVision: the pooled LLM-input video tokens (frames x g x g) by vLLM's rule; the newline
    stays; the image passes whole; logits == hand-fed."""
    from test_anyres import hand_fed, inputs, layouts, packed_features

    from tokenprune.eval.tiny import build_anyres, build_anyres_processor

    kind = "llava_onevision"
    model, proc = build_anyres(kind), build_anyres_processor(kind)
    clean = copy.deepcopy(model)
    inp = inputs(proc, kind, "image_and_video")
    f = packed_features(clean, inp, "video")[0]                       # [F*P + 1, D], newline last
    runs = layouts(clean, inp)
    p = f.shape[0] - 1
    side = (model.config.vision_config.image_size // model.config.vision_config.patch_size + 1) // 2
    frames = p // (side * side)
    assert frames == 4 and frames * side * side == p
    n = vllm_retained_count(side * side, frames, 0.5)
    want = vllm_keep(f[:-1], (frames, side, side), 0.5) + [p]
    with tokenprune.apply(model, "evs", budget=n) as h:
        with torch.no_grad():
            out = model(**inp).logits
        img, vid = h.last_stats.kept_indices[0]
        assert img.numel() == runs[0][2].numel()
        assert vid.tolist() == want
    exp = [(img, {}), (vid, {})]
    torch.testing.assert_close(out, hand_fed(clean, inp, runs, exp), atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_families_without_video_refuse(kind):
    from tokenprune.eval.tiny import build_anyres, build_llava

    model = build_llava() if kind == "llava" else build_anyres(kind)
    with pytest.raises(tokenprune.IncompatibleStrategyError):
        tokenprune.apply(model, "evs", keep=0.5)
    assert tokenprune.get_handle(model) is None
