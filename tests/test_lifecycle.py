"""Lifecycle edges of a handle: all-or-nothing install, double patching through a submodule or a
wrapper, deep copies, per-thread stats, ``labels=``, ``load(inner=...)``, typed errors for the small
cases, and the demo's input bounds."""
from __future__ import annotations

import copy
import gc
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import hook_snapshot, manual_logits, reference_embeds, single

import tokenprune
from tokenprune.eval.tiny import prompt_ids


def logits(model, inp):
    with torch.no_grad():
        return model(**inp).logits


def test_failed_install_rolls_back_and_raises_a_typed_error(model):
    inp = single()
    ref = logits(model, inp)
    before = hook_snapshot(model)     # after a forward: transformers adds its own hooks on the first one
    attn = model.model.language_model.layers[1].self_attn
    q_proj = attn.q_proj
    del attn.q_proj                      # layer K-1 without the q projection fastv needs
    try:
        with pytest.raises(tokenprune.UnsupportedModelError, match="q_proj"):
            tokenprune.apply(model, "fastv", keep=0.5, layer=2)
    finally:
        attn.q_proj = q_proj
    assert tokenprune.get_handle(model) is None and hook_snapshot(model) == before
    assert torch.equal(logits(model, inp), ref)
    tokenprune.apply(model, "fastv", keep=0.5, layer=2).remove()   # the model is usable again


def test_a_hook_failing_mid_install_is_rolled_back(model, monkeypatch):
    logits(model, single())
    before = hook_snapshot(model)
    calls = []
    real = torch.nn.Module.register_forward_pre_hook

    def flaky(self, *a, **k):      # the 4th hook registration fails
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated")
        return real(self, *a, **k)
    monkeypatch.setattr(torch.nn.Module, "register_forward_pre_hook", flaky)
    with pytest.raises(tokenprune.UnsupportedModelError, match="rolled back"):
        tokenprune.apply(model, "hiprune", keep=0.5)
    monkeypatch.undo()
    assert tokenprune.get_handle(model) is None and hook_snapshot(model) == before


@pytest.mark.parametrize("first,second", [("inner", "outer"), ("outer", "inner"), ("compiled", "original"),
                                          ("original", "compiled")])
def test_double_patching_anywhere_in_the_module_tree_is_refused(model, first, second):
    compiled = torch.compile(model, backend="eager")
    pick = {"inner": model.model, "outer": model, "compiled": compiled, "original": model}
    handle = tokenprune.apply(pick[first], "random", keep=0.5)
    with pytest.raises(tokenprune.AlreadyAppliedError):
        tokenprune.apply(pick[second], "hiprune", keep=0.5)
    assert tokenprune.get_handle(pick[second]) is handle
    tokenprune.remove(pick[second])       # found from either end
    assert tokenprune.get_handle(model) is None
    tokenprune.apply(pick[second], "random", keep=0.5).remove()


def test_deepcopy_of_a_patched_model_is_patched_with_its_own_handle(model):
    inp = single()
    handle = tokenprune.apply(model, "hiprune", keep=0.3)
    pruned = logits(model, inp)
    twin = copy.deepcopy(model)
    other = tokenprune.get_handle(twin)
    assert other is not None and other is not handle and other.model is twin and other.active
    assert other.last_stats is None
    assert torch.equal(logits(twin, inp), pruned)
    assert other.last_stats.visual_tokens_kept == handle.last_stats.visual_tokens_kept
    # each copy's hooks serve its own handle: removing one leaves the other patched
    other.remove()
    assert torch.equal(logits(model, inp), pruned)
    handle.remove()
    assert torch.equal(logits(twin, inp), logits(model, inp))


def test_last_stats_are_the_calling_threads_own(model):
    handle = tokenprune.apply(model, "random", keep=0.5)
    inputs = {1: single(n_images=1, seed=1), 2: single(n_images=2, seed=2)}   # 64 vs 128 visual tokens
    seen, errors, barrier = {1: [], 2: []}, [], threading.Barrier(2)

    def work(n):
        try:
            for _ in range(3):
                logits(model, inputs[n])
                barrier.wait(timeout=120)         # both threads have called before either reads
                seen[n].append(handle.last_stats.visual_tokens_in)
                barrier.wait(timeout=120)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    ts = [threading.Thread(target=work, args=(n,)) for n in inputs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert seen == {1: [[64]] * 3, 2: [[128]] * 3}
    assert handle.last_stats is None         # this thread ran nothing
    handle.remove()


def test_encodings_of_a_finished_thread_are_freed(model):
    """Encodings wait per thread (thread-local): once the thread ends they are gone, not kept until
    ``remove()``."""
    import weakref

    handle = tokenprune.apply(model, "random", keep=0.5)
    refs = []

    def work():
        logits(model, single())
        refs.append(weakref.ref(handle._local.encoded[-1]))
        assert refs[0]() is not None        # held while the thread lives
    t = threading.Thread(target=work)
    t.start()
    t.join()
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None
    assert "_encoded_by_thread" not in vars(handle)
    handle.remove()


@pytest.mark.parametrize("strategy,kw", [("random", {"keep": 0.3}), ("fastv", {"keep": 0.3, "layer": 2})])
def test_labels_give_the_loss_of_the_kept_sequence(model, strategy, kw):
    inp = single()
    ids = inp["input_ids"]
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100
    labels[0, 2] = -100
    handle = tokenprune.apply(model, strategy, **kw)
    cap = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: cap.append(k["inputs_embeds"]) if not cap else None, with_kwargs=True)
    with torch.no_grad():
        out = model(**inp, labels=labels)
    h.remove()
    st = handle.last_stats
    handle.remove()
    keep = ids[0] != model.config.image_token_id
    vis = torch.nonzero(~keep).flatten()
    keep[vis[st.kept_indices[0][0]]] = True
    embeds = reference_embeds(model, ids, inp["pixel_values"])
    ref = manual_logits(model, ids, embeds, keep, layer=kw.get("layer", 0))
    kept_labels = labels[:, keep]
    want = torch.nn.functional.cross_entropy(ref[0, :-1], kept_labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] == int(keep.sum())


def test_load_accepts_inner(saved_llava):
    model, processor, handle = tokenprune.load(str(saved_llava), "hiprune", keep=0.5, inner=("fastv", {"keep": 0.5}),
                                               dtype=torch.float32)
    assert handle.lspec.name == "fastv" and handle.vspec.name == "hiprune"
    with pytest.raises(tokenprune.ConfigError):
        tokenprune.load(str(saved_llava), "hiprune", keep=0.5, inner=("fastv", {"keep": 2.0}))
    with pytest.raises(tokenprune.ConfigError):
        tokenprune.load(str(saved_llava), inner=("fastv", {"keep": 0.5}))


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    from tokenprune.eval.tiny import build_llava, build_processor

    path = tmp_path_factory.mktemp("llava")
    build_llava(seed=0).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


def test_remove_on_an_unpatched_model_is_typed(model):
    with pytest.raises(tokenprune.NotAppliedError):
        tokenprune.remove(model)
    assert issubclass(tokenprune.NotAppliedError, tokenprune.TokenPruneError)


def test_numpy_numbers_are_accepted(model):
    inp = single()
    a = tokenprune.apply(model, "fastv", keep=np.float64(0.5), layer=np.int64(2))
    ref = logits(model, inp)
    a.remove()
    b = tokenprune.apply(model, "fastv", keep=0.5, layer=2)
    assert torch.equal(logits(model, inp), ref) and type(b.config.layer) is int
    b.remove()
    with tokenprune.apply(model, "random", budget=np.int32(10)) as h:
        logits(model, inp)
        assert h.last_stats.visual_tokens_kept == [10]


def test_a_prompt_past_the_models_positions_warns(model):
    limit = model.config.text_config.max_position_embeddings
    ids = prompt_ids(64, prefix=limit, seed=0)
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": single()["pixel_values"]}
    with tokenprune.apply(model, "random", keep=0.5):
        with pytest.warns(tokenprune.TokenPruneWarning, match="max_position_embeddings"):
            logits(model, inp)
        with warnings.catch_warnings():
            warnings.simplefilter("error", tokenprune.TokenPruneWarning)
            logits(model, single())


def test_cli_refuses_zero_new_tokens(capsys):
    from tokenprune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "--max-new-tokens", "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_demo_bounds_file_size_and_pixels_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from tokenprune import runner as rn
    from tokenprune.demo import compare

    big = tmp_path / "huge.png"
    Image.new("L", (7000, 7000)).save(big)            # a few KB on disk, 49 MP decoded
    decoded = []
    real = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: decoded.append(1) or real(self, *a, **k))
    out = compare(None, str(big), "what color", "hiprune", 0.25, "")
    assert out[-1].startswith("**Error:**") and "pixels" in out[-1] and not decoded
    monkeypatch.setattr(rn, "MAX_FILE_BYTES", 100)
    out = compare(None, str(big), "what color", "hiprune", 0.25, "")
    assert "MB allowed" in out[-1]


def test_gif_decodes_only_the_sampled_frames(tmp_path, monkeypatch):
    from PIL import Image

    from tokenprune.runner import open_video

    frames = [Image.new("RGB", (16, 16), (i, 0, 0)) for i in range(40)]
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=20)
    from PIL import GifImagePlugin

    seeks = []
    real = GifImagePlugin.GifImageFile.seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "seek", lambda self, i: seeks.append(i) or real(self, i))
    arr = open_video(path, frames=8)
    assert arr.shape == (8, 16, 16, 3)
    assert sorted(set(seeks) - {0}) == sorted(set(np.linspace(0, 39, 8).round().astype(int).tolist()) - {0})
    assert list(arr[:, 0, 0, 0]) == [f.getpixel((0, 0))[0] for f in
                                     [frames[i] for i in np.linspace(0, 39, 8).round().astype(int)]]


def test_debug_log_says_what_was_hooked_and_kept(model, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="tokenprune"):
        with tokenprune.apply(model, "random", budget=10):
            logits(model, single())
    text = caplog.text
    assert "installed random on LlavaForConditionalGeneration" in text and "model.multi_modal_projector" in text
    assert "random kept [10] of [64] visual tokens" in text


def _cache_kw():
    from tokenprune.testing import cache_kwarg

    return cache_kwarg()


def _turn1(model, inp):
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    from tokenprune.testing import output_cache

    return out, output_cache(out)


def test_a_continuation_chunk_wholly_inside_the_pruned_cache_is_refused(model):
    """Chunked prefill of a second turn: a first chunk made only of tokens the cache already holds
    is refused (typed) rather than written into the cache twice. transformers before 5.18 splits the
    whole conversation from token 0 (its own chunked continuation is wrong unpatched too): the engine
    then refuses the first chunk's mismatched mask, also typed."""
    inp = single()
    with tokenprune.apply(model, "random", keep=0.5):          # 32 of 64 image tokens pruned
        out, cache = _turn1(model, inp)
        conv = torch.cat([out.sequences, torch.tensor([[20, 21, 22, 23, 24]])], 1)
        with pytest.raises(tokenprune.UnsupportedCallError, match="wholly in the pruned cache|the attention_mask covers 8 tokens"):
            with torch.no_grad():
                model.generate(input_ids=conv, attention_mask=torch.ones_like(conv), **{_cache_kw(): cache},
                               max_new_tokens=2, prefill_chunk_size=8)


def test_a_reset_cache_starts_a_new_generation(model):
    inp, other = single(seed=0), single(seed=1)
    with tokenprune.apply(model, "hiprune", keep=0.3):
        _, cache = _turn1(model, inp)
        cache.reset()
        if cache.get_seq_length() != 0:
            pytest.skip("this transformers' DynamicLayer.reset zeroes the tensors but keeps their length, "
                        "so generate continues the reset cache (unpatched too)")
        with torch.no_grad():
            again = model.generate(**other, **{_cache_kw(): cache}, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            fresh = model.generate(**other, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(again, fresh)


def test_plain_forwards_without_a_cache_choose_afresh(model):
    """Only an explicit use_cache=False call (a generate step) continues the previous one's inner
    selection; two plain forwards are two prefills."""
    inp = single()
    longer = dict(inp, input_ids=torch.cat([inp["input_ids"], torch.tensor([[30, 31]])], 1))
    longer["attention_mask"] = torch.ones_like(longer["input_ids"])
    with tokenprune.apply(model, "fastv", keep=0.3) as h:
        logits(model, inp)
        logits(model, longer)
        after = h.last_stats.kept_indices[0][0]
    with tokenprune.apply(model, "fastv", keep=0.3) as h:
        logits(model, longer)
        assert torch.equal(after, h.last_stats.kept_indices[0][0])


def test_labels_with_return_dict_false_give_the_loss_first(model):
    inp = single()
    labels = inp["input_ids"].clone()
    with tokenprune.apply(model, "random", keep=0.3):
        with torch.no_grad():
            d = model(**inp, labels=labels)
            t = model(**inp, labels=labels, return_dict=False)
    assert isinstance(t, tuple) and torch.equal(t[0], d.loss) and torch.equal(t[1], d.logits)
