"""Build the embedded default: ``assets/tiny-llava`` (a random-weight LLaVA-1.5 of the real classes,
with a real processor) and ``assets/demo.png``. Offline, deterministic, < 1 MB.

The weights are untrained: answers are meaningless; the folder exercises the real
``from_pretrained`` path. (A trained tiny model is the subject of its own issue.)

    python -m tokenprune.eval.make_assets [--out assets]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def demo_image(size: int = 224):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 225))
    d = ImageDraw.Draw(img)
    d.ellipse((20, 30, 90, 100), fill=(220, 30, 30))
    d.rectangle((120, 40, 190, 110), fill=(30, 90, 220))
    d.polygon([(60, 200), (110, 130), (160, 200)], fill=(40, 170, 60))
    return img


def make(out: Path) -> None:
    from tokenprune.eval.tiny import build_llava, build_processor

    proc = build_processor()
    model = build_llava(seed=0)
    model.config.image_token_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    target = out / "tiny-llava"
    model.to(torch.float32).save_pretrained(target)
    proc.save_pretrained(target)
    demo_image().save(out / "demo.png")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "assets")
    make(ap.parse_args().out)
