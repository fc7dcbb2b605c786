"""Synthetic VQA data and the training path (issue 7): deterministic, and what the model is trained
on equals what the real processor gives it at inference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.research.train import encode_batch
from tokenprune.eval.synthetic.model import build_processor, normalise
from tokenprune.eval.synthetic.questions import ANSWERS, TYPES, sample_question
from tokenprune.eval.synthetic.scenes import GRID, render, sample_scene, to_pil
from tokenprune.eval.synthetic.splits import split


def test_scenes_are_deterministic_and_labelled():
    a = split(6, seed=5)
    b = split(6, seed=5)
    assert [s.scene for s in a] == [s.scene for s in b] and [s.question for s in a] == [s.question for s in b]
    imgs_a, lab_a = render([s.scene for s in a])
    imgs_b, lab_b = render([s.scene for s in b])
    assert torch.equal(imgs_a, imgs_b) and torch.equal(lab_a, lab_b)
    assert imgs_a.shape == (6, 3, 224, 224) and lab_a.shape == (6, GRID, GRID, 3)
    assert torch.equal(imgs_a, (imgs_a * 255).round() / 255)             # uint8 levels
    for s, lab in zip(a, lab_a):
        assert int(lab[..., 2].sum()) == len(s.scene.objects)              # one centre flag per object
        assert 0 < int((lab[..., 1] > 0).sum()) < GRID * GRID // 4         # objects cover few patches
        for o in s.scene.objects:                                          # the centre patch has its class
            assert int(lab[o.y // 14, o.x // 14, 1]) > 0


def test_questions_cover_every_type_with_valid_answers():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        s = sample_scene(rng)
        q, a, t = sample_question(s, rng)
        assert a in ANSWERS and q.split()[-1] != a
        seen.add(t)
        if t == "count":
            assert a == ("one", "two", "three", "four")[len(s.objects) - 1]
        if t == "exists" and a == "yes":
            assert any(f"{o.color} {o.shape}" in q for o in s.objects)
    assert seen == set(TYPES)


def test_training_inputs_equal_processor_inputs():
    samples = split(4, seed=7)
    proc = build_processor()
    imgs, _ = render([s.scene for s in samples])
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": s.question}]}],
                                      add_generation_prompt=True) for s in samples]
    enc = proc(images=[to_pil(i) for i in imgs], text=texts, return_tensors="pt", padding=True)
    assert torch.allclose(enc["pixel_values"], normalise(imgs), atol=1e-5)
    ids, mask, labels = encode_batch(proc.tokenizer, [s.question for s in samples], [s.answer for s in samples],
                                     GRID * GRID, proc.tokenizer.convert_tokens_to_ids("<image>"))
    for i in range(4):  # right-padded training row == left-padded processor row, then answer + eos
        row = ids[i][mask[i].bool()].tolist()
        ref = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        assert row[:len(ref)] == ref
        answer = proc.tokenizer(samples[i].answer).input_ids
        assert row[len(ref):] == answer + [proc.tokenizer.eos_token_id]
        assert labels[i][len(ref):len(ref) + 2].tolist() == answer + [proc.tokenizer.eos_token_id]
        assert (labels[i][:len(ref)] == -100).all()


@pytest.mark.slow
def test_training_command_smoke(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from eval.research.train import main

    log = main(["--out", str(tmp_path / "m"), "--device", "cpu", "--steps-a", "1", "--steps-b", "1", "--batch", "2"])
    assert log["stage_a_steps"] == 1 and log["stage_b_steps"] == 1 and 0 <= log["validation"]["overall"] <= 1
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.float16 and AutoProcessor.from_pretrained(tmp_path / "m").tokenizer is not None
    assert json.loads((tmp_path / "m" / "training.json").read_text())["batch"] == 2


def test_clips_are_deterministic_and_events_change_only_their_patches():
    from tokenprune.eval.synthetic.clips import FRAMES, ask_clip, clip_split, render_clips

    a, b = clip_split(12, 3), clip_split(12, 3)
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    assert {s.clip.event for s in a} == {"move", "appear", "recolor"}
    frames, labels = render_clips([s.clip for s in a[:6]])
    assert frames.shape == (6, FRAMES, 3, 224, 224) and labels.shape == (6, FRAMES, 16, 16, 3)
    for i, s in enumerate(a[:6]):
        changed = (frames[i, 0] != frames[i, -1]).any(0).float().mean().item()
        assert 0 < changed < 0.15, (s.clip.event, changed)      # static background, a local event
        for qtype in ("moves", "direction", "appears", "turns", "count_end"):
            qa = ask_clip(s.clip, qtype)
            assert qa is None or (qa[1].count(" ") == 0)        # one-word answers


def test_video_model_processor_matches_training_inputs_and_trains(tmp_path):
    """The real LlavaOnevisionProcessor on a rendered clip gives exactly the training ids and
    pixels; a few training steps run, save, and load back through tokenprune.load."""
    import torch

    import tokenprune
    from eval.research.train_video import build_processor, build_tokenizer, encode, normalise, train
    from tokenprune.eval.synthetic.clips import clip_split, render_clips

    s = clip_split(1, 5)[0]
    frames, _ = render_clips([s.clip])
    arr = (frames[0].permute(0, 2, 3, 1) * 255).round().byte().numpy()
    proc = build_processor()
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                     "text": s.question}]}], add_generation_prompt=True)
    enc = proc(text=text, videos=[arr], return_tensors="pt")
    ids, _, _ = encode(build_tokenizer(), [s.question], None)
    assert torch.equal(enc["input_ids"], ids)
    torch.testing.assert_close(enc["pixel_values_videos"][0], normalise(frames[0]), atol=1e-6, rtol=0)
    log = train(tmp_path / "m", "cpu", 1, 2, 2, n_val=4, vision_layers=1, vision_hidden=32, llm_layers=2,
                llm_hidden=64)
    assert log["steps_a"] >= 1 and log["steps_b"] >= 1 and 0 <= log["validation"]["accuracy"] <= 1
    model, p, h = tokenprune.load(str(tmp_path / "m"), "holitom", keep=0.25, dtype=torch.float32)
    with torch.no_grad():
        model(**{k: v for k, v in p(text=text, videos=[arr], return_tensors="pt").items()})
    assert h.last_stats.visual_tokens_kept == [round(0.25 * 512) + 1]


def test_video_training_single_frames_in_stage_a_and_event_supervision(tmp_path):
    """--frames-a 1 (stage A on one random frame per clip) and --event-aux run through the real
    trainer; the stage-A shape accuracy is logged; the event head is not part of the saved model."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from eval.research.train_video import train

    log = train(tmp_path / "m", "cpu", 1, 2, 2, n_val=4, frames_a=1, event_aux=0.5, vision_layers=1,
                vision_hidden=32, llm_layers=2, llm_hidden=64)
    assert log["frames_a"] == 1 and log["event_aux"] == 0.5 and log["steps_a"] >= 1 and log["steps_b"] >= 1
    assert 0 <= log["stage_a_patch_shape_acc"] <= 1
    saved = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert not any("event" in k for k in saved.state_dict())


def test_dense_shape_loss_object_weight():
    """object_weight=1 is the unweighted loss (no weight tensor at all, so the image trainer is
    unchanged); a larger weight moves the shape loss towards the object patches' loss."""
    from eval.research.train import N_PAIRS, DenseHeads

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 257, 32, generator=g)
    labels = torch.zeros(2, 16, 16, 3, dtype=torch.long)
    labels[:, 4:6, 4:6, 0], labels[:, 4:6, 4:6, 1] = 3, 2                # one 2 x 2-patch object
    pairs = torch.zeros(2, N_PAIRS)
    torch.manual_seed(0)
    plain = DenseHeads(32)
    torch.manual_seed(0)
    weighted = DenseHeads(32, object_weight=10.0)
    assert plain.shape_weight is None and DenseHeads(32, 1.0).shape_weight is None
    lp, info = plain.loss(hidden, labels, pairs)
    lw, _ = weighted.loss(hidden, labels, pairs)
    h = plain.norm(hidden)[:, 1:]
    ce = torch.nn.functional.cross_entropy(plain.shape(h).transpose(1, 2), labels[..., 1].reshape(2, -1),
                                           reduction="none")
    obj = labels[..., 1].reshape(2, -1) > 0
    w = torch.where(obj, 10.0, 1.0)
    expected = (ce * w).sum() / w.sum() - ce.mean()                       # the only term that changes
    torch.testing.assert_close(lw - lp, expected)
    assert 0 <= info["patch_shape_acc"] <= 1


def test_video_dropout_masks_only_video_tokens_and_keeps_newline():
    """Visual-token dropout removes video tokens only (through the mask), keeps the first video
    token and the trailing newline, leaves padding and text alone, and keeps whole rows sometimes."""
    import torch

    from eval.research.train_video import build_tokenizer, drop_visual, encode

    tok = build_tokenizer()
    ids, mask, _ = encode(tok, ["which shape moves", "how many objects are there at the end"], ["circle", "two"])
    vid_id = tok.convert_tokens_to_ids("<video>")
    vid = ids == vid_id
    g = torch.Generator().manual_seed(0)
    fracs = []
    for _ in range(20):
        m = drop_visual(ids, mask, vid_id, g)
        assert torch.equal(m[~vid], mask[~vid])                       # text and padding untouched
        assert (m <= mask).all()
        for r in range(ids.shape[0]):
            pos = vid[r].nonzero()[:, 0]
            assert m[r, pos[0]] == 1 and m[r, pos[-1]] == 1           # first token and newline kept
            fracs.append(m[r, pos].float().mean().item())
    assert min(fracs) < 0.5 and max(fracs) == 1.0


def test_video_dropout_object_centred_rows_and_pooled_objects():
    """With object tokens given, a share of the rows keeps object tokens first (all of them, or
    only objects); object_share=0 reproduces the random masks exactly; pooled_objects maps 2 x 2
    patches to the model's frame-major pooled token order."""
    import torch

    from eval.research.train_video import build_tokenizer, drop_visual, encode, pooled_objects

    labels = torch.zeros(2, 8, 16, 16, 3, dtype=torch.long)
    labels[0, 3, 5, 9, 1] = 2                                        # frame 3, patch (5, 9) -> cell (2, 4)
    obj = pooled_objects(labels)
    assert obj.shape == (2, 512) and obj.sum() == 1 and obj[0, 3 * 64 + 2 * 8 + 4]

    tok = build_tokenizer()
    ids, mask, _ = encode(tok, ["which shape moves"] * 400, ["circle"] * 400)
    vid_id = tok.convert_tokens_to_ids("<video>")
    body = (ids == vid_id) & (ids == vid_id).long().cumsum(1).lt(513)   # video tokens before the newline
    objects = torch.zeros(400, 512, dtype=torch.bool)
    objects[:, 100:130] = True                                        # 30 object tokens per clip
    plain = drop_visual(ids, mask, vid_id, torch.Generator().manual_seed(1))
    same = drop_visual(ids, mask, vid_id, torch.Generator().manual_seed(1), objects, 0.0)
    assert torch.equal(plain, same)
    m = drop_visual(ids, mask, vid_id, torch.Generator().manual_seed(1), objects, 0.35)
    assert torch.equal(m[~body], mask[~body])                       # text, newline, padding untouched
    kept = m[body].reshape(400, 512).bool()
    part = ~kept.all(1)
    centred = (kept[:, 100:130].all(1) & (kept.sum(1) > 30)) | (kept.sum(1) - kept[:, 100:130].sum(1) == 0)
    assert 0.40 < (centred & part).sum() / part.sum() < 0.58          # ~0.35 / 0.75 of the partial rows
    assert kept.any(1).all()


def test_video_event_targets_mark_the_changing_object_per_frame():
    """Event supervision targets: the target object's tokens in the frames that show it, with the
    clip's class (direction for moves); static objects and background are 0; an appearing
    object is 0 before it appears; a recolouring one is marked in every frame."""
    from eval.research.train_video import EVENT_CLASSES, event_targets, pooled_objects
    from tokenprune.eval.synthetic.clips import Clip, render_clips
    from tokenprune.eval.synthetic.scenes import Obj, Scene

    still = Obj("square", "red", "big", 40, 40)
    mover = Obj("circle", "blue", "big", 60, 170)
    clips = [Clip(Scene((still, mover), 3), "move", 1, to=(180, 170)),
             Clip(Scene((still, mover), 3), "move", 1, to=(20, 170)),
             Clip(Scene((still, mover), 3), "appear", 1, at=5),
             Clip(Scene((still, mover), 3), "recolor", 1, at=4, to="green")]
    _, labels = render_clips(clips)
    t = event_targets(clips, labels).reshape(4, 8, 64)
    objects = pooled_objects(labels).reshape(4, 8, 64)
    assert t.shape == (4, 8, 64) and (t[~objects] == 0).all()          # background never
    still_cells = slice(0, 3 * 8)                                       # rows 0-2 of the 8 x 8 cells hold the square
    assert (t[:, :, still_cells] == 0).all() and objects[:, :, still_cells].any()
    names = [EVENT_CLASSES[int(r.max())] for r in t]
    assert names == ["moves right", "moves left", "appears", "turns"]
    assert (t[0] > 0).any(1).all() and (t[1] > 0).any(1).all()          # the mover in every frame
    assert not (t[2, :5] > 0).any() and (t[2, 5:] > 0).any(1).all()     # appears at frame 5
    assert (t[3] > 0).any(1).all()


def test_video_event_loss_reads_attended_video_tokens_only():
    """The event loss is finite, trains its head, and ignores masked-out (dropped) video tokens
    and the text; event and static tokens are weighted equally."""
    from eval.research.train_video import build_tokenizer, encode, event_loss

    tok = build_tokenizer()
    ids, mask, _ = encode(tok, ["which shape moves"] * 2, ["circle"] * 2)
    vid_id = tok.convert_tokens_to_ids("<video>")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*ids.shape, 16, generator=g)
    head = torch.nn.Linear(16, 5)
    targets = torch.zeros(2, 512, dtype=torch.long)
    targets[:, 10:14] = 2
    loss = event_loss(head, hidden, ids, mask, targets, vid_id)
    loss.backward()
    assert torch.isfinite(loss) and head.weight.grad.abs().sum() > 0
    pos = (ids == vid_id).nonzero()
    first = int(pos[pos[:, 0] == 0][0, 1])
    dropped = mask.clone()
    dropped[:, first + 20:first + 40] = 0                               # drop 20 static tokens per row
    changed = targets.clone()
    changed[:, 20:40] = 3                                               # their targets no longer matter
    changed_hidden = hidden.clone()
    changed_hidden[:, :first] = 0                                       # nor does the text
    a = event_loss(head, hidden, ids, dropped, targets, vid_id)
    b = event_loss(head, changed_hidden, ids, dropped, changed, vid_id)
    assert torch.equal(a, b)
    logits = head(hidden[ids == vid_id].reshape(2, 513, 16)[:, :512]).detach()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1), reduction="none")
    m = targets.reshape(-1) > 0
    torch.testing.assert_close(loss.detach(), (ce[m].mean() + ce[~m].mean()) / 2)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_training_freezes_tower_and_warm_starts_llm(tmp_path):
    """--freeze-tower: stage B leaves the tower as stage A left it and trains the projector;
    --init-llm copies LLM + lm_head from a saved model (checked with a zero learning rate);
    every phase of a step is timed in the log."""
    from transformers import LlavaForConditionalGeneration

    from eval.research.train import main
    from tokenprune.eval.synthetic.model import build_model

    fresh = build_model(0)
    log = main(["--out", str(tmp_path / "f"), "--device", "cpu", "--steps-a", "0", "--steps-b", "2", "--batch", "2",
                "--freeze-tower", "--n-val", "4"])
    frozen = LlavaForConditionalGeneration.from_pretrained(tmp_path / "f")
    assert log["freeze_tower"] and log["stage_b_steps"] == 2
    assert set(log["stage_b_phase_ms"]) == {"data", "forward", "backward", "optimizer"}
    assert _same(_state(frozen.model.vision_tower), _state(fresh.model.vision_tower))
    assert not _same(_state(frozen.model.multi_modal_projector), _state(fresh.model.multi_modal_projector))

    main(["--out", str(tmp_path / "w"), "--device", "cpu", "--steps-a", "0", "--steps-b", "1", "--batch", "2",
          "--init-llm", str(tmp_path / "f"), "--lr-scale", "0", "--n-val", "4"])
    warm = LlavaForConditionalGeneration.from_pretrained(tmp_path / "w")
    assert _same(_state(warm.model.language_model), _state(frozen.model.language_model))
    assert _same(_state(warm.lm_head), _state(frozen.lm_head))
    assert _same(_state(warm.model.multi_modal_projector), _state(fresh.model.multi_modal_projector))


def test_video_training_freezes_tower_and_continues_from_a_saved_model(tmp_path):
    """Video stage B with freeze_tower leaves the tower untouched and trains the rest; init
    continues from the saved model (a zero learning rate leaves it exactly as saved)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from eval.research.train_video import build_model, train

    kw = dict(vision_layers=1, vision_hidden=32, llm_layers=1, llm_hidden=64)
    fresh = build_model(0, **kw)
    log = train(tmp_path / "f", "cpu", 0, 0.5, 2, n_val=2, freeze_tower=True, **kw)
    assert log["steps_a"] == 0 and log["steps_b"] >= 1 and log["freeze_tower"]
    assert set(log["phase_ms_b"]) == {"data", "forward", "backward", "optimizer"}
    frozen = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "f")
    assert _same(_state(frozen.model.vision_tower), _state(fresh.model.vision_tower))
    assert not _same(_state(frozen.model.language_model), _state(fresh.model.language_model))

    log = train(tmp_path / "c", "cpu", 0, 0.5, 2, n_val=2, lr_scale=0.0, init=tmp_path / "f")
    assert log["init"] == str(tmp_path / "f") and log["previous"]["freeze_tower"]
    cont = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "c")
    assert _same(_state(cont), _state(frozen))


def test_dropout_masks_mix_full_random_and_object_centred_rows():
    from eval.research.train import dropout_masks

    torch.manual_seed(0)
    b, n = 4000, GRID * GRID
    objects = torch.zeros(b, n, dtype=torch.bool)
    objects[:, :20] = True                                    # 20 object patches per row
    keep = dropout_masks(objects, object_share=0.35)
    assert keep.shape == (b, n) and keep.any(1).all()
    full = keep.all(1)
    assert abs(full.float().mean().item() - 0.25) < 0.03      # 25% of rows keep everything
    part = keep[~full]
    k = part.sum(1)
    # object-centred rows: either every kept token is an object, or every object is kept
    centred = (part[:, 20:].sum(1) == 0) | (part[:, :20].all(1) & (k > 20))
    # random rows are centred only by chance (a tiny subset that hits objects only): share ~0.35/0.75
    assert 0.40 < centred.float().mean().item() < 0.55
    assert k.min() >= 1 and (k.float() / n).max() <= 1
    rand = dropout_masks(objects, object_share=0.0)
    rand = rand[~rand.all(1)]
    assert ((rand[:, 20:].sum(1) == 0) | rand[:, :20].all(1)).float().mean() < 0.1


def test_video_model_from_image_model_carries_tower_projector_and_llm_over():
    """transfer.from_image_model: the patch embedding on SigLIP-normalised pixels equals the image
    tower's on CLIP-normalised pixels (normalisation folded into the conv); the tower layers up to
    the image feature layer and the projector are copied; the Qwen2 LLM (zero q/k/v biases) is the
    same function as the Llama one; word rows are copied by word."""
    from transformers import LlavaForConditionalGeneration

    from eval.research import train_video
    from eval.research.transfer import from_image_model
    from tokenprune.eval.synthetic import model as image_model
    from tokenprune.runner import ASSETS

    path = ASSETS / "tiny-llava-vqa"
    image = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    video = from_image_model(path).eval()
    assert video.config.vision_config.num_hidden_layers == 5          # vision_feature_layer -2 of 6
    assert video.config.vision_config.hidden_act == image.config.vision_config.hidden_act
    imgs, _ = render([sample_scene(np.random.default_rng(3))])
    with torch.no_grad():
        a = image.model.vision_tower.embeddings.patch_embedding(image_model.normalise(imgs))
        b = video.model.vision_tower.embeddings.patch_embedding(train_video.normalise(imgs))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    isd, vsd = image.state_dict(), video.state_dict()
    for k in ("model.vision_tower.encoder.layers.4.mlp.fc2.weight", "model.multi_modal_projector.linear_2.bias"):
        assert torch.equal(vsd[k], isd[k])
    assert torch.equal(vsd["model.vision_tower.embeddings.position_embedding.weight"],
                       isd["model.vision_tower.embeddings.position_embedding.weight"][1:])
    x = torch.randn(2, 12, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(video.model.language_model(inputs_embeds=x).last_hidden_state,
                                   image.model.language_model(inputs_embeds=x).last_hidden_state)
    iv, vv = image_model.build_tokenizer().get_vocab(), train_video.build_tokenizer().get_vocab()
    for vw, iw in (("triangle", "triangle"), ("red", "red"), ("<video>", "<image>")):
        assert torch.equal(vsd["lm_head.weight"][vv[vw]], isd["lm_head.weight"][iv[iw]])
        assert torch.equal(vsd["model.language_model.embed_tokens.weight"][vv[vw]],
                           isd["model.language_model.embed_tokens.weight"][iv[iw]])


def test_video_training_from_image_model_command(tmp_path):
    """--init-image through the real command line: the saved video model has the image model's
    5-layer quick_gelu tower; --init and --init-image together are refused."""
    import pytest
    from transformers import LlavaOnevisionForConditionalGeneration

    from eval.research.train_video import main
    from tokenprune.runner import ASSETS

    image = str(ASSETS / "tiny-llava-vqa")
    log = main(["--out", str(tmp_path / "m"), "--device", "cpu", "--init-image", image,
                "--seconds-a", "0.5", "--seconds-b", "0.5", "--batch", "2", "--n-val", "2", "--freeze-tower"])
    assert log["init_image"] == image and log["steps_a"] >= 1 and log["steps_b"] >= 1
    saved = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert saved.config.vision_config.num_hidden_layers == 5 and saved.config.vision_config.hidden_act == "quick_gelu"
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--init", str(tmp_path / "m"), "--init-image", image])
