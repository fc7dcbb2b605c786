"""Synthetic VQA data and the training path (issue 7): deterministic, and what the model is trained
on equals what the real processor gives it at inference."""
from __future__ import annotations

import json

import numpy as np
import torch

from tokenprune.eval.synthetic.model import build_processor, normalise
from tokenprune.eval.synthetic.questions import ANSWERS, TYPES, sample_question
from tokenprune.eval.synthetic.scenes import GRID, render, sample_scene, to_pil
from tokenprune.eval.synthetic.splits import split
from tokenprune.eval.synthetic.train import encode_batch


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


def test_training_command_smoke(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokenprune.eval.synthetic.train import main

    log = main(["--out", str(tmp_path / "m"), "--device", "cpu", "--steps-a", "1", "--steps-b", "1", "--batch", "2"])
    assert log["stage_a_steps"] == 1 and log["stage_b_steps"] == 1 and 0 <= log["validation"]["overall"] <= 1
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.float16 and AutoProcessor.from_pretrained(tmp_path / "m").tokenizer is not None
    assert json.loads((tmp_path / "m" / "training.json").read_text())["batch"] == 2
