"""Export questions of the synthetic test split as the lmms-eval local task's parquet (images
embedded as PNG with the HF ``Image`` feature, so ``load_dataset("parquet")`` decodes them).

    python -m tokenprune.eval.synthetic.export [--n 100]
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

from .scenes import render, to_pil
from .splits import TEST_SEED, split

TASK_FILE = Path(__file__).resolve().parents[1] / "tasks" / "tokenprune_vqa" / "data" / "tokenprune_vqa.parquet"


def export(n: int = 100, out: Path = TASK_FILE) -> Path:
    from datasets import Dataset, Features, Image, Value

    samples = split(n, seed=TEST_SEED)
    imgs, _ = render([s.scene for s in samples])
    rows = {"id": [], "image": [], "question": [], "answer": [], "qtype": []}
    for i, (s, img) in enumerate(zip(samples, imgs)):
        buf = io.BytesIO()
        to_pil(img).save(buf, format="PNG", optimize=True)
        rows["id"].append(i)
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["question"].append(s.question)
        rows["answer"].append(s.answer)
        rows["qtype"].append(s.qtype)
    feats = Features({"id": Value("int32"), "image": Image(), "question": Value("string"),
                      "answer": Value("string"), "qtype": Value("string")})
    out.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=feats).to_parquet(str(out))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    print(export(ap.parse_args().n))
