"""Train the tiny VQA LLaVA and save it with ``save_pretrained`` (weights fp16 + processor).

    python -m eval.research.train --out assets/tiny-llava-vqa [--device cuda]

Stage A (vision tower): dense per-patch supervision on the feature layer (colour, shape and
object-centre of each patch) plus a CLS multi-label loss over (colour, shape) pairs, as CLIP-style
towers are trained to summarise through CLS. This makes the tower's attention object-centric.
Stage B (projector + LLM, tower fine-tuned with the dense loss kept on): next-token loss on the
one-word answer, with visual-token dropout (keep 5-100% of the visual tokens, random or
object-centred subsets, original position ids) so that the model is robust to pruning itself and
the fidelity benchmark measures *which* tokens a strategy keeps. Learning rates follow a cosine
over max(step/steps, time/budget), so a run fits its time budget on any device; the steps done are
saved in ``training.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenprune.eval.synthetic.model import build_model, build_processor, normalise, prompt_text
from tokenprune.eval.synthetic.questions import TYPES, sample_question
from tokenprune.eval.synthetic.scenes import COLOR_NAMES, GRID, SHAPES, render, sample_scene

N_PAIRS = len(COLOR_NAMES) * len(SHAPES)


class DenseHeads(nn.Module):
    """Per-patch colour / shape / centre heads and a CLS pair head on the feature layer."""

    def __init__(self, d: int, object_weight: float = 1.0) -> None:
        super().__init__()
        # weight of the object classes in the shape loss (background = 1): objects are a few
        # percent of the patches, so at 1 the background dominates the shape gradient
        self.register_buffer("shape_weight", None if object_weight == 1.0 else
                             torch.tensor([1.0] + [object_weight] * len(SHAPES)), persistent=False)
        self.norm = nn.LayerNorm(d)
        self.color = nn.Linear(d, len(COLOR_NAMES) + 1)
        self.shape = nn.Linear(d, len(SHAPES) + 1)
        self.centre = nn.Linear(d, 1)
        self.pairs = nn.Linear(d, N_PAIRS)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """hidden [B, 1 + 256, d]; labels [B, 16, 16, 3]; pairs [B, N_PAIRS] multi-hot."""
        h = self.norm(hidden.float())
        patch, cls = h[:, 1:], h[:, 0]
        lab = labels.reshape(labels.shape[0], -1, 3)
        lc = F.cross_entropy(self.color(patch).transpose(1, 2), lab[..., 0])
        ls = F.cross_entropy(self.shape(patch).transpose(1, 2), lab[..., 1], weight=self.shape_weight)
        lz = F.binary_cross_entropy_with_logits(self.centre(patch)[..., 0], lab[..., 2].float(),
                                                pos_weight=torch.tensor(20.0, device=h.device))
        lp = F.binary_cross_entropy_with_logits(self.pairs(cls), pairs, pos_weight=torch.tensor(9.0, device=h.device))
        obj = lab[..., 1] > 0
        acc = (self.shape(patch).argmax(-1) == lab[..., 1])[obj].float().mean()
        return lc + ls + lz + lp, {"patch_shape_acc": acc.item()}


def pair_targets(scenes: list, device: str | torch.device) -> torch.Tensor:
    """[B, N_PAIRS] multi-hot (colour, shape) pairs, built on the host and moved once: one
    indexed write per object on a GPU tensor cost a kernel launch each."""
    t = np.zeros((len(scenes), N_PAIRS), np.float32)
    for i, s in enumerate(scenes):
        for o in s.objects:
            t[i, COLOR_NAMES.index(o.color) * len(SHAPES) + SHAPES.index(o.shape)] = 1
    return torch.from_numpy(t).to(device)


class PhaseTimer:
    """Median wall time (ms) of each phase of a training step, measured on every ``every``-th
    step with the device synchronised at each mark, so that a run's log says where its time goes
    (host-side data and kernel launches vs device compute) without slowing the other steps."""

    def __init__(self, device: str | torch.device, every: int = 10) -> None:
        self.cuda, self.every = str(device).startswith("cuda"), every
        self.times: dict[str, list[float]] = {}
        self.on, self.t = False, 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, step: int) -> None:
        self.on = step % self.every == 0      # step 0's one-off warm-up is one sample of the median
        if self.on:
            self.t = self._now()

    def mark(self, phase: str) -> None:
        if self.on:
            now = self._now()
            self.times.setdefault(phase, []).append(1000 * (now - self.t))
            self.t = now

    def summary(self) -> dict[str, float]:
        return {k: round(float(np.median(v)), 2) for k, v in self.times.items()}


_TOKEN_CACHE: dict[int, dict[str, list[int]]] = {}


def encode_batch(tokenizer: Any, questions: list[str], answers: list[str] | None, n_img: int,
                 image_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] with each ``<image>`` expanded to ``n_img`` tokens (what the
    processor does), attention mask, and labels (the answer word and eos at their own positions,
    -100 elsewhere)."""
    rows, labs = [], []
    cache = _TOKEN_CACHE.setdefault(id(tokenizer), {})

    def tok(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tokenizer(text).input_ids
        return cache[text]
    for i, q in enumerate(questions):
        ids = tok(prompt_text(q))
        k = ids.index(image_token_id)
        ids = ids[:k] + [image_token_id] * n_img + ids[k + 1:]
        lab = [-100] * len(ids)
        if answers is not None:
            ans = tok(answers[i]) + [tokenizer.eos_token_id]
            lab = [-100] * len(ids) + ans          # labels[t] = the token at t (answer word, eos)
            ids = ids + ans
        rows.append(ids)
        labs.append(lab)
    return pad_rows(rows, labs, left=False)


def pad_rows(rows: list[list[int]], labs: list[list[int]], left: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows and their labels -> (ids, attention mask, labels) [B, L], padded with 0 / -100
    on the left or the right."""
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        span = slice(length - len(r), length) if left else slice(0, len(r))
        ids[i, span], mask[i, span], labels[i, span] = r, 1, lab
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)


def vqa_loss(model: Any, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
             keep_visual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer loss on the sequence with only the kept visual tokens, at their original positions.

    hidden: feature-layer output [B, 1 + N, d]; keep_visual: [B, N] bool or None (keep all).
    Returns (loss, answer-token accuracy per row)."""
    core = model.model
    feats = core.multi_modal_projector(hidden[:, 1:])
    img = ids == model.config.image_token_id
    emb = core.get_input_embeddings()(ids)
    emb = emb.masked_scatter(img[..., None], feats.to(emb.dtype))
    keep = mask.bool()
    if keep_visual is not None:
        keep = keep.clone()
        keep[img] = keep_visual.reshape(-1)
    b = ids.shape[0]
    n = keep.sum(1)
    length = int(n.max())
    # pack kept tokens to the left (stable order), pad on the right
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :length]
    valid = torch.arange(length, device=ids.device)[None] < n[:, None]
    pos = torch.where(valid, order, order[:, :1])
    emb_k = torch.gather(emb, 1, pos[..., None].expand(-1, -1, emb.shape[-1]))
    lab_k = torch.where(valid, torch.gather(labels, 1, pos), torch.full_like(pos, -100))
    out = core.language_model(inputs_embeds=emb_k, attention_mask=valid.long(), position_ids=pos)
    logits = model.lm_head(out.last_hidden_state).float()
    # labels[t] is the token at t: predict it from t - 1
    lg, lb = logits[:, :-1], lab_k[:, 1:]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100)
    first = (lb != -100).float().argmax(1)
    pred = lg[torch.arange(b), first].argmax(-1)
    return loss, pred == lb[torch.arange(b), first]


def objects_first(objects: torch.Tensor, frac: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Object-centred subsets [B, N] bool: per row the object tokens first (in random order), then
    the others, cut at round(frac * N) tokens (at least one). objects [B, N] bool, frac [B]."""
    n = objects.shape[1]
    score = objects.float() + torch.rand(objects.shape, generator=generator, device=objects.device)
    rank = score.argsort(1, descending=True).argsort(1)             # objects score in (1, 2), others (0, 1)
    return rank < (frac * n).round().clamp(min=1)[:, None]


def dropout_masks(objects: torch.Tensor, object_share: float, full_share: float = 0.25) -> torch.Tensor:
    """Visual-token dropout masks [B, N] bool for stage B.

    objects: [B, N] bool, the patches that show an object (from the dense labels).
    A ``full_share`` of rows keep every token; the others keep a 5-100% subset, either uniformly
    random or, for an ``object_share`` of all rows, object-centred: the object patches first (in
    random order), then background patches, cut at the same fraction. Pruning strategies keep
    tight object-centred subsets, which random subsets almost never are; without them the model
    saw such inputs only in the benchmark, and at small budgets it often failed to stop after the
    answer word. Every row keeps at least one token."""
    b, n = objects.shape
    dev = objects.device
    u = torch.rand(b, device=dev)
    frac = torch.where(u < full_share, torch.ones(b, device=dev), 0.05 + 0.95 * torch.rand(b, device=dev))
    keep = torch.rand(b, n, device=dev) < frac[:, None]
    centred = objects_first(objects, frac)
    keep = torch.where(((u >= full_share) & (u < full_share + object_share))[:, None], centred, keep)
    empty = ~keep.any(1)                                               # a random row may keep nothing
    keep[torch.arange(b, device=dev), torch.randint(n, (b,), device=dev)] |= empty
    return keep


def cosine(progress: float, warm: float = 0.03) -> float:
    if progress < warm:
        return progress / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warm) / (1 - warm))))


def train(out: Path, device: str, steps_a: int, steps_b: int, seconds_a: float, seconds_b: float,
          batch: int, seed: int, log_every: int = 50, init: Path | None = None,
          lr_scale: float = 1.0, freeze_tower: bool = False, init_llm: Path | None = None,
          n_val: int = 512, object_share: float = 0.35) -> dict[str, Any]:
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    processor = build_processor()
    tok = processor.tokenizer
    if init is None:
        model = build_model(seed, device).train()
    else:  # continue from a saved checkpoint (a second session on a lent GPU)
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32).to(device).train()
    if init_llm is not None:  # warm start of LLM + lm_head only (the tower and projector start fresh)
        from transformers import LlavaForConditionalGeneration
        src = LlavaForConditionalGeneration.from_pretrained(init_llm, dtype=torch.float32)
        model.model.language_model.load_state_dict(src.model.language_model.state_dict())
        model.lm_head.load_state_dict(src.lm_head.state_dict())
    tower = model.model.vision_tower
    heads = DenseHeads(model.config.vision_config.hidden_size).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    n_img = GRID * GRID
    log: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                           "batch": batch, "seed": seed, "init": str(init) if init else None, "lr_scale": lr_scale,
                           "freeze_tower": freeze_tower, "init_llm": str(init_llm) if init_llm else None,
                           "object_share": object_share}
    if init is not None and (Path(init) / "training.json").exists():
        log["previous"] = json.loads((Path(init) / "training.json").read_text())

    def features(imgs: torch.Tensor, grad: bool = True) -> torch.Tensor:
        with amp, torch.set_grad_enabled(grad):
            hs = tower(normalise(imgs), output_hidden_states=True).hidden_states
        return hs[model.config.vision_feature_layer]

    # ---- stage A: the vision tower --------------------------------------------------------
    timer = PhaseTimer(device)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=2e-3, weight_decay=0.01)
    t0, step, loss, info = time.time(), 0, torch.zeros(()), {}
    bar = tqdm(total=steps_a, desc="stage A (vision)")
    while True:
        prog = 1.0 if steps_a == 0 else max(step / steps_a, (time.time() - t0) / seconds_a)
        if prog >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = 2e-3 * cosine(prog)
        timer.start(step)
        scenes = [sample_scene(rng) for _ in range(batch)]
        imgs, labels = render(scenes, device)
        pairs = pair_targets(scenes, device)
        timer.mark("data")
        hidden = features(imgs)
        loss, info = heads.loss(hidden, labels, pairs)
        timer.mark("forward")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        timer.mark("backward")
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        opt.step()
        timer.mark("optimizer")
        step += 1
        bar.update()
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", shape=f"{info['patch_shape_acc']:.2f}")
    bar.close()
    log.update(stage_a_steps=step, stage_a_seconds=time.time() - t0, stage_a_loss=loss.item(),
               stage_a_phase_ms=timer.summary(), **info)

    # ---- stage B: projector + LLM (tower fine-tuned with the dense loss kept, or frozen) ----
    # A frozen tower keeps its stage-A features local: the answer loss cannot teach it to copy
    # object information into every token, so answers depend on which tokens are kept.
    tower.requires_grad_(not freeze_tower)
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")],
               "base": 1e-3 * lr_scale}]
    if not freeze_tower:
        groups.insert(0, {"params": list(tower.parameters()) + list(heads.parameters()), "base": 3e-4 * lr_scale})
    opt = torch.optim.AdamW([{"params": g["params"], "lr": g["base"]} for g in groups], weight_decay=0.01)
    t0, step, accs, timer = time.time(), 0, [], PhaseTimer(device)
    bar = tqdm(total=steps_b, desc="stage B (VQA)")
    while True:
        prog = max(step / steps_b, (time.time() - t0) / seconds_b)
        if prog >= 1:
            break
        for g, spec in zip(opt.param_groups, groups):
            g["lr"] = spec["base"] * cosine(prog)
        timer.start(step)
        scenes = [sample_scene(rng) for _ in range(batch)]
        qa = [sample_question(s, rng) for s in scenes]
        ids, mask, labels = encode_batch(tok, [q for q, _, _ in qa], [a for _, a, _ in qa], n_img,
                                         model.config.image_token_id)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        imgs, plabels = render(scenes, device)
        keep_visual = dropout_masks(plabels[..., 1].reshape(batch, -1) > 0, object_share)
        pairs = None if freeze_tower else pair_targets(scenes, device)
        timer.mark("data")
        hidden = features(imgs, grad=not freeze_tower)
        with amp:
            loss, ok = vqa_loss(model, hidden, ids, mask, labels, keep_visual)
            total = loss if pairs is None else loss + 0.3 * heads.loss(hidden, plabels, pairs)[0]
        timer.mark("forward")
        opt.zero_grad(set_to_none=True)
        total.backward()
        timer.mark("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        timer.mark("optimizer")
        step += 1
        accs.append(ok.float().mean().item())
        bar.update()
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{np.mean(accs[-log_every:]):.2f}")
    bar.close()
    log.update(stage_b_steps=step, stage_b_seconds=time.time() - t0, stage_b_loss=loss.item(),
               stage_b_train_acc=float(np.mean(accs[-log_every:])) if accs else None,
               stage_b_phase_ms=timer.summary())

    model.eval()
    log["validation"] = evaluate(model, tok, device, n=n_val, seed=10_000 + seed)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(log, indent=1))
    return log


@torch.no_grad()
def evaluate(model: Any, tok: Any, device: str, n: int, seed: int, batch: int = 128) -> dict[str, float]:
    """Unpruned answer accuracy per question type on ``n`` fresh scenes (the training path)."""
    rng = np.random.default_rng(seed)
    hits: dict[str, list[bool]] = {t: [] for t in TYPES}
    tower = model.model.vision_tower
    for start in range(0, n, batch):
        scenes = [sample_scene(rng) for _ in range(min(batch, n - start))]
        qa = [sample_question(s, rng) for s in scenes]
        ids, mask, labels = encode_batch(tok, [q for q, _, _ in qa], [a for _, a, _ in qa], GRID * GRID,
                                         model.config.image_token_id)
        imgs, _ = render(scenes, device)
        hidden = tower(normalise(imgs).to(model.dtype), output_hidden_states=True).hidden_states[-2]
        _, ok = vqa_loss(model, hidden, ids.to(device), mask.to(device), labels.to(device), None)
        for (_, _, t), o in zip(qa, ok.tolist()):
            hits[t].append(o)
    res = {t: float(np.mean(v)) for t, v in hits.items() if v}
    res["overall"] = float(np.mean([o for v in hits.values() for o in v]))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m eval.research.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("assets/tiny-llava-vqa"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps-a", type=int, default=3000)
    ap.add_argument("--steps-b", type=int, default=6000)
    ap.add_argument("--seconds-a", type=float, default=70, help="time budget of stage A")
    ap.add_argument("--seconds-b", type=float, default=200, help="time budget of stage B")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, help="continue from this saved model (e.g. with --steps-a 0)")
    ap.add_argument("--lr-scale", type=float, default=1.0)
    ap.add_argument("--freeze-tower", action="store_true",
                    help="stage B trains projector + LLM only (tower features stay as stage A left them)")
    ap.add_argument("--init-llm", type=Path, help="warm-start LLM + lm_head from this saved model")
    ap.add_argument("--n-val", type=int, default=512, help="validation questions after training")
    ap.add_argument("--object-share", type=float, default=0.35,
                    help="share of stage-B rows whose dropout keeps object patches first (the rest: random)")
    a = ap.parse_args(argv)
    log = train(a.out, a.device, a.steps_a, a.steps_b, a.seconds_a, a.seconds_b, a.batch, a.seed,
                init=a.init, lr_scale=a.lr_scale, freeze_tower=a.freeze_tower, init_llm=a.init_llm,
                n_val=a.n_val, object_share=a.object_share)
    print(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
