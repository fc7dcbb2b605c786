"""Demo images for the CLI and the Gradio app: scenes of the synthetic VQA task (a split of its
own, seed 30_000) with their questions, written to ``assets/``. Deterministic, offline, ~100 KB.

The embedded model ``assets/tiny-llava-vqa`` is made by ``python -m eval.research.train``.

    python -m eval.research.make_assets [--out assets]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES_SEED = 30_000


def to_pil(img):
    from tokenprune.eval.synthetic.scenes import to_pil as convert

    return convert(img)


def make(out: Path, n: int = 4) -> None:
    from tokenprune.eval.synthetic.scenes import render
    from tokenprune.eval.synthetic.splits import split

    samples = split(n, seed=EXAMPLES_SEED)
    imgs, _ = render([s.scene for s in samples])
    (out / "examples").mkdir(parents=True, exist_ok=True)
    meta = []
    for i, (s, img) in enumerate(zip(samples, imgs)):
        path = out / "examples" / f"scene{i}.png"
        to_pil(img).save(path)
        meta.append({"image": f"examples/{path.name}", "question": s.question, "answer": s.answer})
    to_pil(imgs[0]).save(out / "demo.png")
    (out / "examples" / "examples.json").write_text(json.dumps(meta, indent=1))
    make_clip(out)


def make_clip(out: Path) -> dict[str, str]:
    """A demo clip for ``tokenprune run --video`` (the embedded video model): the first clip of its
    own split (seed 30_000) whose question asks which colour an object turns, as an 8-frame GIF."""
    import torch

    from tokenprune.eval.synthetic.clips import clip_split, render_clips

    s = next(c for c in clip_split(200, EXAMPLES_SEED) if c.qtype == "turns")
    frames, _ = render_clips([s.clip])
    frames = frames[0].clone()
    # GIF writers merge identical consecutive frames (a static stretch of the clip would lose
    # frames): one corner pixel steps by 1/255 per frame to keep all 8
    frames[:, :, 0, 0] = (frames[:, :, 0, 0] + torch.arange(len(frames))[:, None] / 255).clamp(0, 1)
    ims = [to_pil(f) for f in frames]
    path = out / "examples" / "clip0.gif"
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=250, loop=0)
    meta = {"video": f"examples/{path.name}", "question": s.question, "answer": s.answer}
    (out / "examples" / "clips.json").write_text(json.dumps([meta], indent=1))
    return meta


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "assets")
    make(ap.parse_args().out)
