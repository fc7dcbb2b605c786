"""Train the tiny video LLaVA-OneVision on the synthetic clips and save it with ``save_pretrained``.

    python -m eval.research.train_video --out assets/tiny-ov-video [--device cuda]

The model is a real ``LlavaOnevisionForConditionalGeneration`` (SigLIP-style tower 224 px / 14 ->
16 x 16 patches per frame, 6 x 128 from scratch, no CLS; Qwen2 LLM 4 x 256) with a real
``LlavaOnevisionProcessor`` built offline; a clip of 8 frames is 8 x 64 pooled tokens + 1 newline.
``--init-image assets/tiny-llava-vqa`` (the shipped model's recipe) starts instead from the tiny
image model's tower (5 layers), projector and LLM (:mod:`.transfer`): from scratch on a CPU the
tower never learned shapes and the LLM never learned the lookup; from the image model, 4 minutes
of stage A and 40 of stage B reach 90% on the test clips.
Stage A trains the tower with dense per-patch supervision on every frame (colour, shape,
object centre; a mean-token pair head stands in for CLS), which makes its attention
object-centric (``tiny-model-notes.md``); stage B trains projector + LLM (tower fine-tuned, the
dense loss kept on; or frozen with ``--freeze-tower``, so that its features stay local) on the
one-word answers through the model's own forward. Time-budgeted cosine
schedules as the image model, so a run fits its budget on any device.

Event supervision (``--event-aux``, stage B; off by default): the tower sees one frame at a time,
so every temporal comparison has to happen in the tiny LLM. As the tower's dense per-patch loss
does for objects, a linear head on the LLM's hidden state after layer ``--event-layer`` classifies
every video token (``EVENT_CLASSES``: static, or part of the object that moves left / moves right /
appears / turns colour), which asks that layer to compare each cell across frames; the answers are
still read through the LM head only. In CPU trials from scratch it did not help, because that
tower did not encode shape at all (``probe_video``); the shipped model did not need it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenprune.eval.synthetic.clips import FRAMES, ClipSample, clip_split, render_clips, sample_clip, sample_clip_question
from tokenprune.eval.synthetic.questions import ANSWERS
from tokenprune.eval.synthetic.scenes import render
from tokenprune.eval.synthetic.video_model import (  # noqa: F401
    CHAT_TEMPLATE,
    CHAT_WORDS,
    POOLED,
    SIGLIP_MEAN,
    SIGLIP_STD,
    SPECIAL,
    WORDS,
    build_model,
    build_processor,
    build_tokenizer,
    video_config,
)

from .train import DenseHeads, PhaseTimer, cosine, objects_first, pad_rows, pair_targets


def normalise(frames: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> SigLIP normalisation (what the video processor does)."""
    return (frames - 0.5) / 0.5


def prompt_text(question: str) -> str:
    return f"user : <video> {question} assistant : "


def encode(tokenizer: Any, questions: list[str], answers: list[str] | None, frames: int = FRAMES
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids with ``<video>`` expanded to frames x 64 + 1 tokens (as the processor does),
    mask, labels (answer word and eos only)."""
    vid = SPECIAL.index("<video>")
    n_vid = frames * POOLED * POOLED + 1
    rows, labs = [], []
    for i, q in enumerate(questions):
        ids = tokenizer(prompt_text(q)).input_ids
        k = ids.index(vid)
        ids = ids[:k] + [vid] * n_vid + ids[k + 1:]
        lab = [-100] * len(ids)
        if answers is not None:
            ans = tokenizer(answers[i]).input_ids + [tokenizer.eos_token_id]
            ids, lab = ids + ans, lab + ans
        rows.append(ids)
        labs.append(lab)
    return pad_rows(rows, labs, left=True)


def tower_hidden(model: Any, frames: torch.Tensor) -> torch.Tensor:
    """Last hidden state of the tower for [B, F, 3, H, W] frames -> [B*F, 256, d]."""
    return model.model.vision_tower(normalise(frames.flatten(0, 1))).last_hidden_state


def dense_loss(heads: DenseHeads, hidden: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor) -> tuple:
    """Dense per-patch loss of [N, 256, d] frame features; labels [N, 16, 16, 3], pairs [N, N_PAIRS]."""
    with_mean = torch.cat([hidden.mean(1, keepdim=True), hidden], 1)   # no CLS: a mean token stands in
    return heads.loss(with_mean, labels, pairs)


@torch.no_grad()
def evaluate(model: Any, tok: Any, samples: list[ClipSample], device: str, batch: int = 32) -> dict[str, float]:
    """First-answer-token accuracy, overall and per question type."""
    model.eval()
    answer_ids = {tok(a).input_ids[0]: a for a in set(ANSWERS)}
    right: dict[str, list[bool]] = {}
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        frames, _ = render_clips([s.clip for s in part], device=device)
        ids, mask, _ = encode(tok, [s.question for s in part], None)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       pixel_values_videos=normalise(frames), logits_to_keep=1).logits[:, -1]
        pred = logits.argmax(-1).tolist()
        for s, p in zip(part, pred):
            right.setdefault(s.qtype, []).append(answer_ids.get(p) == s.answer)
    allr = [x for v in right.values() for x in v]
    return {"accuracy": float(np.mean(allr)), **{t: float(np.mean(v)) for t, v in right.items()}}


#: per-video-token classes of the event supervision (0: static background or an unchanged object)
EVENT_CLASSES = ("static", "moves left", "moves right", "appears", "turns")


def event_targets(clips: list[Any], labels: torch.Tensor) -> torch.Tensor:
    """Clips and their patch labels [B, F, 16, 16, 3] -> [B, F * 64] long ``EVENT_CLASSES``
    index per pooled video token: the clip's event class where the token shows an object and
    its cell's content (colour, shape) is not the same in every frame, else 0."""
    b, f = labels.shape[:2]
    content = labels[..., 0] * 16 + labels[..., 1]                              # [B, F, 16, 16]
    cell = cell_max((content != content[:, :1]).any(1))[:, None] > 0            # [B, 1, 64]
    present = pooled_objects(labels).reshape(b, f, -1)
    cls = []
    for c in clips:
        if c.event == "move":
            cls.append(1 if c.to[0] < c.scene.objects[c.target].x else 2)
        else:
            cls.append(3 if c.event == "appear" else 4)
    cls_t = torch.tensor(cls, device=labels.device)[:, None, None]
    return torch.where(present & cell, cls_t, 0).reshape(b, -1)


def event_loss(head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
               targets: torch.Tensor, video_token_id: int) -> torch.Tensor:
    """Class-balanced cross-entropy of ``head`` on the LLM hidden states [B, L, d] of the attended
    video tokens (newline excluded); targets [B, F * 64]. Event tokens are a few percent of a
    clip, so event and static tokens are averaged separately and weighted equally."""
    vid = ids == video_token_id
    last = vid.long().cumsum(1) == vid.sum(1, keepdim=True)
    frame_tok = vid & ~last                                                      # [B, L], F * 64 per row
    logits = head(hidden[frame_tok].float())                                     # [B * F * 64, C]
    tgt = targets.reshape(-1)
    att = mask[frame_tok].bool()
    ce = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
    pos, neg = att & (tgt > 0), att & (tgt == 0)
    parts = [ce[m].mean() for m in (pos, neg) if m.any()]
    return torch.stack(parts).mean()


def cell_max(grid: torch.Tensor) -> torch.Tensor:
    """Per-patch values [..., 16, 16] -> [..., 64] float: the max over the 2 x 2 patches of each
    pooled video token, in the model's row-major pooled order."""
    pooled = torch.nn.functional.max_pool2d(grid.float().reshape(-1, 1, *grid.shape[-2:]), 2, ceil_mode=True)
    return pooled.reshape(*grid.shape[:-2], -1)


def pooled_objects(labels: torch.Tensor) -> torch.Tensor:
    """Per-patch labels [B, F, 16, 16, 3] -> [B, F * 64] bool: the pooled video tokens (2 x 2
    patches each, in the model's frame-major order) that show part of an object."""
    return cell_max(labels[..., 1] > 0).reshape(labels.shape[0], -1) > 0


def drop_visual(ids: torch.Tensor, mask: torch.Tensor, video_token_id: int, generator: torch.Generator | None = None,
                objects: torch.Tensor | None = None, object_share: float = 0.0) -> torch.Tensor:
    """Visual-token dropout through the attention mask: a quarter of the rows keep every video
    token, the others 5-100% of them (the trailing newline token is always kept): a random subset
    (with the first video token, so never empty) or, for an ``object_share`` of all rows when
    ``objects`` [B, F * 64] is given, an object-centred one (object tokens first, in random order,
    then the others, cut at the same fraction) — the kind of subset attention-based pruning keeps,
    as in the image trainer. Dropped tokens are masked out, so the other tokens keep their original
    positions — what a pruned forward with original position ids sees. ids, mask [B, L] -> new mask."""
    b = ids.shape[0]
    vid = ids == video_token_id
    u = torch.rand(b, generator=generator)
    frac = torch.where(u < 0.25, torch.ones(b), 0.05 + 0.95 * torch.rand(b, generator=generator))
    keep = torch.rand(ids.shape, generator=generator) < frac[:, None]
    last = vid.long().cumsum(1) == vid.sum(1, keepdim=True)      # from the newline token on
    first = vid & (vid.long().cumsum(1) == 1)
    keep = keep | first
    if objects is not None and object_share > 0:
        centred = keep.clone()
        centred[vid & ~last] = objects_first(objects, frac, generator).reshape(-1)
        keep = torch.where(((u >= 0.25) & (u < 0.25 + object_share))[:, None], centred, keep)
    keep = keep | ~vid | (last & vid)
    return mask * keep.to(mask.dtype)


def train(out: Path, device: str, seconds_a: float, seconds_b: float, batch: int, seed: int = 0,
          n_val: int = 200, lr_scale: float = 1.0, dropout: bool = True, freeze_tower: bool = False,
          init: Path | None = None, object_share: float = 0.35, event_aux: float = 0.0, event_layer: int = 2,
          frames_a: int = FRAMES, shape_weight: float = 1.0, init_image: Path | None = None,
          **model_kw: Any) -> dict[str, Any]:
    """Stage A for ``seconds_a`` (skipped with 0), stage B for ``seconds_b``; ``freeze_tower``
    trains projector + LLM only in stage B, ``init`` continues from a saved model; ``event_aux``
    weighs the event supervision of the LLM's layer ``event_layer`` (0: off); stage A trains on
    ``frames_a`` random frames of each of ``batch`` clips (``FRAMES``: all of them), with the
    object classes of the dense shape loss weighted ``shape_weight`` against background;
    ``init_image`` starts from the tiny image model's tower, projector and LLM (:mod:`.transfer`)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    if init_image is not None:
        from .transfer import from_image_model
        model = from_image_model(init_image, seed, device).train()
    elif init is None:
        model = build_model(seed, device, **model_kw).train()
    else:
        from transformers import LlavaOnevisionForConditionalGeneration
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(init, dtype=torch.float32,
                                                                       attn_implementation="sdpa").to(device).train()
    tower = model.model.vision_tower
    tok = build_tokenizer()
    heads = DenseHeads(model.config.vision_config.hidden_size, shape_weight).to(device)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda")
           else contextlib.nullcontext())
    log: dict[str, Any] = {"device": device, "batch": batch, "lr_scale": lr_scale, "dropout": dropout,
                           "freeze_tower": freeze_tower, "init": str(init) if init else None, "model": model_kw,
                           "object_share": object_share, "event_aux": event_aux, "event_layer": event_layer,
                           "frames_a": frames_a, "shape_weight": shape_weight,
                           "init_image": str(init_image) if init_image else None}
    if init is not None and (Path(init) / "training.json").exists():
        log["previous"] = json.loads((Path(init) / "training.json").read_text())

    def clips_batch(every: int | None) -> tuple[list[ClipSample], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Clips with questions, frames [B, F, 3, H, W], patch labels, and the pair targets of
        every ``every``-th frame for the dense loss (None: no dense loss)."""
        cs = [sample_clip(rng) for _ in range(batch)]
        samples = [ClipSample(c, *sample_clip_question(c, rng)) for c in cs]
        frames, labels = render_clips(cs, device=device)
        pairs = None if every is None else pair_targets([c.frame(t) for c in cs for t in range(0, FRAMES, every)],
                                                         device)
        return samples, frames, labels, pairs

    def dense(frames: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor, every: int) -> tuple:
        return dense_loss(heads, tower_hidden(model, frames[:, ::every]), labels[:, ::every].flatten(0, 1), pairs)

    # stage A: tower + dense heads on every frame (or frames_a random frames) of each clip
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=1e-3)
    t0, step, timer = time.time(), 0, PhaseTimer(device)
    recent: list[float] = []                   # patch shape accuracy of the last 50 stage-A steps
    with tqdm(desc="stage A (tower)", unit="step") as bar:
        while time.time() - t0 < seconds_a:
            for g in opt.param_groups:
                g["lr"] = 1e-3 * cosine((time.time() - t0) / max(seconds_a, 1e-9))
            timer.start(step)
            if frames_a >= FRAMES:
                _, frames, labels, pairs = clips_batch(1)
            else:                # a few random frames per clip: the frames of a clip repeat each other
                scenes = [c.frame(int(t)) for c in (sample_clip(rng) for _ in range(batch))
                          for t in rng.choice(FRAMES, frames_a, replace=False)]
                imgs, lab = render(scenes, device)
                frames, labels, pairs = imgs[:, None], lab[:, None], pair_targets(scenes, device)
            timer.mark("data")
            with amp:
                loss, info = dense(frames, labels, pairs, 1)
            timer.mark("forward")
            opt.zero_grad()
            loss.backward()
            timer.mark("backward")
            torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
            opt.step()
            timer.mark("optimizer")
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.2f}" for k, v in info.items()})
            recent = (recent + [info["patch_shape_acc"]])[-50:]
    log["steps_a"], log["phase_ms_a"] = step, timer.summary()
    if recent:   # does the tower tell shapes apart? (the shape answers cannot be better than this)
        log["stage_a_patch_shape_acc"] = round(float(np.mean(recent)), 3)
    # stage B: VQA through the model's forward; the tower fine-tuned with the dense loss kept on
    # (on every 4th frame), or frozen so that its stage-A features stay local
    tower.requires_grad_(not freeze_tower)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    if event_aux > 0:            # a training-only head: not part of the saved model
        event_head = torch.nn.Linear(model.config.text_config.hidden_size, len(EVENT_CLASSES)).to(device)
        params += list(event_head.parameters())
    groups = [{"params": params, "lr": 5e-4 * lr_scale}]
    if not freeze_tower:
        groups.append({"params": list(tower.parameters()) + list(heads.parameters()), "lr": 1e-4 * lr_scale})
    opt = torch.optim.AdamW(groups)
    base = [g["lr"] for g in opt.param_groups]
    t0, step, timer = time.time(), 0, PhaseTimer(device)
    with tqdm(desc="stage B (VQA)", unit="step") as bar:
        while time.time() - t0 < seconds_b:
            f = cosine((time.time() - t0) / max(seconds_b, 1e-9))
            for g, b0 in zip(opt.param_groups, base):
                g["lr"] = b0 * f
            timer.start(step)
            samples, frames, labels, pairs = clips_batch(None if freeze_tower else 4)
            ids, mask, lab = encode(tok, [s.question for s in samples], [s.answer for s in samples])
            if dropout:
                mask = drop_visual(ids, mask, model.config.video_token_id, gen, pooled_objects(labels).cpu(),
                                   object_share)
            ids, mask, lab = ids.to(device), mask.to(device), lab.to(device)
            timer.mark("data")
            with amp:
                out_ = model(input_ids=ids, attention_mask=mask, labels=lab, pixel_values_videos=normalise(frames),
                             output_hidden_states=event_aux > 0)
                loss = out_.loss if pairs is None else out_.loss + 0.2 * dense(frames, labels, pairs, 4)[0]
                if event_aux > 0:
                    ev = event_loss(event_head, out_.hidden_states[event_layer], ids, mask,
                                    event_targets([s.clip for s in samples], labels), model.config.video_token_id)
                    loss = loss + event_aux * ev
            timer.mark("forward")
            opt.zero_grad()
            loss.backward()
            timer.mark("backward")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            timer.mark("optimizer")
            step += 1
            bar.update()
            bar.set_postfix(vqa=f"{out_.loss.item():.3f}", **({"event": f"{ev.item():.3f}"} if event_aux > 0 else {}))
    log["steps_b"], log["phase_ms_b"] = step, timer.summary()
    model.eval()
    log["validation"] = evaluate(model, tok, clip_split(n_val, 10_000 + seed), device)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    build_processor().save_pretrained(out)
    (out / "training.json").write_text(json.dumps(log, indent=1))
    return log


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m eval.research.train_video",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("assets/tiny-ov-video"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds-a", type=float, default=60.0)
    ap.add_argument("--seconds-b", type=float, default=240.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--lr-scale", type=float, default=1.0)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--no-dropout", action="store_true", help="train on full token sets only")
    ap.add_argument("--freeze-tower", action="store_true",
                    help="stage B trains projector + LLM only (tower features stay as stage A left them)")
    ap.add_argument("--init", type=Path, help="continue from this saved model (e.g. with --seconds-a 0)")
    ap.add_argument("--init-image", type=Path,
                    help="start from this tiny image model's tower, projector and LLM (e.g. assets/tiny-llava-vqa)")
    ap.add_argument("--object-share", type=float, default=0.35,
                    help="share of stage-B rows whose dropout keeps object tokens first (the rest: random)")
    ap.add_argument("--event-aux", type=float, default=0.0,
                    help="weight of the per-video-token event supervision of the LLM (0: answers only)")
    ap.add_argument("--frames-a", type=int, default=FRAMES,
                    help="stage A: random frames per clip (fewer = more scenes per step for the same tower work)")
    ap.add_argument("--shape-weight", type=float, default=1.0,
                    help="weight of the object classes in the tower's dense shape loss (background: 1)")
    ap.add_argument("--event-layer", type=int, default=2, help="LLM layer whose output the event head reads")
    a = ap.parse_args(argv)
    if a.init and a.init_image:
        ap.error("--init and --init-image are exclusive")
    kw = {} if a.init or a.init_image else {"llm_layers": a.llm_layers}
    log = train(a.out, a.device, a.seconds_a, a.seconds_b, a.batch, a.seed, a.n_val, lr_scale=a.lr_scale,
                dropout=not a.no_dropout, freeze_tower=a.freeze_tower, init=a.init,
                object_share=a.object_share, event_aux=a.event_aux, event_layer=a.event_layer,
                frames_a=a.frames_a, shape_weight=a.shape_weight, init_image=a.init_image, **kw)
    print(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
