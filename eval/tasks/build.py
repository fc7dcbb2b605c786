"""The local lmms-eval task ``tokenprune_vqa``, built on first use: 100 questions of the synthetic
test split, images rendered deterministically (``tokenprune.eval.synthetic``) and embedded in a
parquet (HF ``Image`` feature, so ``load_dataset("parquet")`` decodes them).

The parquet is not shipped (6 MB): it is written, with a copy of the task's YAML and ``utils.py``,
to a folder of the user's cache, which is what lmms-eval's ``--include_path`` takes:

    python -m tokenprune.eval.tasks          # prints that folder (building it if needed)
    lmms-eval --include_path "$(python -m tokenprune.eval.tasks)" --tasks tokenprune_vqa ...
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

TASK = "tokenprune_vqa"
N_QUESTIONS = 100
_SOURCE = Path(__file__).resolve().parent / TASK      # the shipped YAML + utils.py


def cache_root() -> Path:
    """``$TOKENPRUNE_CACHE``, else ``$XDG_CACHE_HOME/tokenprune``, else ``~/.cache/tokenprune``."""
    if os.environ.get("TOKENPRUNE_CACHE"):
        return Path(os.environ["TOKENPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenprune"


def _version() -> str:
    """Changes whenever the task's shipped files or the rendering code change."""
    from tokenprune.eval.synthetic import questions, scenes, splits

    h = hashlib.sha256(f"n={N_QUESTIONS}".encode())
    for f in [*sorted(_SOURCE.iterdir()), Path(scenes.__file__), Path(questions.__file__), Path(splits.__file__)]:
        if f.is_file() and f.suffix in (".yaml", ".py"):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def write_parquet(out: Path, n: int = N_QUESTIONS) -> Path:
    """Render ``n`` test-split questions into ``out`` (needs ``datasets``, which lmms-eval brings)."""
    from datasets import Dataset, Features, Image, Value

    from tokenprune.eval.synthetic.scenes import render, to_pil
    from tokenprune.eval.synthetic.splits import TEST_SEED, split

    samples = split(n, seed=TEST_SEED)
    imgs, _ = render([s.scene for s in samples])
    rows: dict[str, list] = {"id": [], "image": [], "question": [], "answer": [], "qtype": []}
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


def include_path() -> Path:
    """The folder to pass as lmms-eval's ``--include_path``, holding ``tokenprune_vqa/`` (YAML,
    ``utils.py``, ``data/tokenprune_vqa.parquet``). Built once per task version; the folder is
    filled in a temporary sibling and renamed, so concurrent first calls never see half a task."""
    root = cache_root() / "lmms_tasks" / _version()
    if (root / TASK / "data" / f"{TASK}.parquet").exists():
        return root
    if root.exists():                 # a build cut off before the parquet was written
        shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root.parent))
    try:
        shutil.copytree(_SOURCE, tmp / TASK, ignore=shutil.ignore_patterns("__pycache__", "data"))
        write_parquet(tmp / TASK / "data" / f"{TASK}.parquet")
        try:
            tmp.rename(root)
        except OSError:               # another process finished first: its copy is the same
            if not (root / TASK / "data" / f"{TASK}.parquet").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
