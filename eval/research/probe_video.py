"""Linear probes of the tiny video model: can a linear read-out tell an object's colour and shape
from the tower's output (per 14-px patch) and from the LLM's input (per pooled video token)?

    python -m eval.research.probe_video [--model assets/tiny-ov-video] [--n 64]

An answer about a shape cannot be better than the shape information the LLM is given, so this
separates "the LLM did not learn the lookup" from "the tower never encoded it". Object tokens
only (background excluded); the probe is fitted on the first half of the clips and scored on the
second; ``majority`` is the share of the most frequent class in the scored half (chance level).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from tokenprune.eval.synthetic.clips import FRAMES, clip_split, render_clips

from .train_video import build_tokenizer, cell_max, encode, normalise

#: (label channel of the patch labels, name, classes)
TARGETS = ((0, "colour", 6), (1, "shape", 4))
PROBE_SEED = 777


def features(model: Any, n: int, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tower output [n, F * 256, d_v], LLM input of the video tokens [n, F * 64, d], patch labels
    [n, F, 16, 16, 3] of ``n`` clips (seed ``PROBE_SEED``), from one forward per batch with hooks."""
    tok = build_tokenizer()
    vid = model.config.video_token_id
    caught: dict[str, list[torch.Tensor]] = {"emb": [], "tower": []}
    hooks = [model.model.language_model.register_forward_pre_hook(
                 lambda m, a, k: caught["emb"].append(k["inputs_embeds"].detach()), with_kwargs=True),
             model.model.vision_tower.register_forward_hook(
                 lambda m, a, o: caught["tower"].append(o.last_hidden_state.detach()))]
    labels, ids_all = [], []
    samples = clip_split(n, PROBE_SEED)
    try:
        with torch.no_grad():
            for i in range(0, n, batch):
                part = samples[i:i + batch]
                frames, lab = render_clips([s.clip for s in part])
                ids, mask, _ = encode(tok, [s.question for s in part], None)
                model(input_ids=ids, attention_mask=mask, pixel_values_videos=normalise(frames).to(model.dtype),
                      logits_to_keep=1)
                labels.append(lab)
                ids_all.append(ids)
    finally:
        for h in hooks:
            h.remove()
    per_clip = FRAMES * 64
    emb = torch.cat([e[i == vid].reshape(i.shape[0], per_clip + 1, -1)[:, :per_clip]   # newline dropped
                     for e, i in zip(caught["emb"], ids_all)])
    tower = torch.cat([t.reshape(-1, FRAMES * t.shape[1], t.shape[2]) for t in caught["tower"]])
    return tower.float(), emb.float(), torch.cat(labels)


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 500, seed: int = 0) -> float:
    """Fit a softmax read-out on the first half of the clips' object tokens, accuracy on the rest.
    x [n, T, d], y [n, T] (0 = background, else class + 1)."""
    half = x.shape[0] // 2
    obj = y > 0
    xtr, ytr = x[:half][obj[:half]], y[:half][obj[:half]] - 1
    xte, yte = x[half:][obj[half:]], y[half:][obj[half:]] - 1
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[-1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin((xtr - mu) / sd), ytr).backward()
            opt.step()
    with torch.no_grad():
        return (lin((xte - mu) / sd).argmax(-1) == yte).float().mean().item()


def run(model_path: str | Path | None = None, n: int = 64) -> dict[str, Any]:
    """Probe accuracies {"tower" | "llm_input": {"colour" | "shape": acc}} and the chance levels."""
    from tokenprune.eval.synthetic.fidelity_video import default_model, load

    model, _ = load(model_path)
    tower, emb, labels = features(model, n)
    b = labels.shape[0]
    res: dict[str, Any] = {"model": str(model_path or default_model()), "n": n}
    for ch, name, k in TARGETS:
        patch = labels[..., ch].reshape(b, -1)                                            # [n, F * 256]
        pooled = cell_max(labels[..., ch]).reshape(b, -1).long()                          # [n, F * 64]
        held = pooled[b // 2:][pooled[b // 2:] > 0] - 1
        res.setdefault("tower", {})[name] = linear_probe(tower, patch, k)
        res.setdefault("llm_input", {})[name] = linear_probe(emb, pooled, k)
        res.setdefault("majority", {})[name] = torch.bincount(held, minlength=k).max().item() / len(held)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m eval.research.probe_video",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a saved video model folder (default: assets/tiny-ov-video)")
    ap.add_argument("--n", type=int, default=64, help="clips (half fit the probe, half score it)")
    a = ap.parse_args(argv)
    res = run(a.model, a.n)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
