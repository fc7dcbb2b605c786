"""Demo images for the CLI and the Gradio app: scenes of the synthetic VQA task (a split of its
own, seed 30_000) with their questions, written to ``assets/``. Deterministic, offline, ~100 KB.

The embedded model ``assets/tiny-llava-vqa`` is made by ``python -m tokenprune.eval.synthetic.train``.

    python -m tokenprune.eval.make_assets [--out assets]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES_SEED = 30_000


def make(out: Path, n: int = 4) -> None:
    from tokenprune.eval.synthetic.scenes import render, to_pil
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "assets")
    make(ap.parse_args().out)
