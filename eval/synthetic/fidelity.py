"""Fidelity benchmark: answer accuracy of every strategy vs visual tokens kept, on the trained tiny
VQA model loaded with ``from_pretrained`` and fed through its real processor.

    tokenprune fidelity [--model assets/tiny-llava-vqa] [--n 1000] [--out eval/results]

Second metric, deterministic: *object recall* = share of the patches covered by an object that a
strategy keeps (what the answer needs; random keeps the keep ratio).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import tokenprune
from tokenprune.runner import DEFAULT_MODEL, user_prompt

from ..results_io import save_results
from .scenes import render, to_pil
from .splits import Sample, split

KEEPS = (1.0, 0.5, 0.333, 0.222, 0.111, 0.056)
STRATEGIES = ("hiprune", "visionzip", "fopru", "fastv", "random", "pool")


def load(path: str | Path = DEFAULT_MODEL):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def prepare(processor: Any, samples: list[Sample]) -> dict[str, Any]:
    """Processor inputs of every sample (left-padded), answer token ids, object-patch masks."""
    imgs, labels = render([s.scene for s in samples])
    texts = [user_prompt(processor, s.question) for s in samples]
    enc = processor(images=[to_pil(i) for i in imgs], text=texts, return_tensors="pt", padding=True)
    answers = torch.tensor([processor.tokenizer(s.answer).input_ids[0] for s in samples])
    return {"inputs": enc, "answers": answers, "objects": labels[..., 1].reshape(len(samples), -1) > 0,
            "types": [s.qtype for s in samples]}


@torch.no_grad()
def predict(model: Any, data: dict[str, Any], batch: int = 64, handle: Any = None) -> tuple[torch.Tensor, float]:
    """Greedy first answer token per sample; object recall of the kept tokens (nan if unpruned)."""
    enc, preds, recall = data["inputs"], [], []
    n = enc["input_ids"].shape[0]
    for s in range(0, n, batch):
        part = {k: v[s:s + batch] for k, v in enc.items()}
        logits = model(**part, logits_to_keep=1).logits[:, -1]
        preds.append(logits.argmax(-1))
        if handle is not None and handle.last_stats is not None:
            for i, row in enumerate(handle.last_stats.kept_indices):
                obj = data["objects"][s + i]
                recall.append(obj[row[0]].sum().item() / max(1, obj.sum().item()))
    return torch.cat(preds), (sum(recall) / len(recall) if recall else float("nan"))


def by_type(ok: torch.Tensor, types: list[str]) -> dict[str, float]:
    """Accuracy per question type: ok [N] bool, types [N] -> {type: share right} (types sorted)."""
    return {t: ok[[x == t for x in types]].float().mean().item() for t in sorted(set(types))}


def run(model_path: str | Path = DEFAULT_MODEL, n: int = 1000, strategies: tuple[str, ...] = STRATEGIES,
        keeps: tuple[float, ...] = KEEPS) -> dict[str, Any]:
    from tqdm import tqdm

    model, processor = load(model_path)
    data = prepare(processor, split(n))
    n_tok = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n_tok *= n_tok
    pred, _ = predict(model, data)
    ok = pred == data["answers"]
    res: dict[str, Any] = {"model": str(model_path), "n": n, "tokens": n_tok, "unpruned": ok.float().mean().item(),
                           "unpruned_by_type": by_type(ok, data["types"]), "rows": []}
    for name in tqdm(strategies, desc="fidelity"):
        for keep in keeps:
            if keep >= 1.0:
                res["rows"].append({"strategy": name, "keep": 1.0, "kept": n_tok, "accuracy": res["unpruned"],
                                    "object_recall": 1.0})
                continue
            h = tokenprune.apply(model, name, keep=keep)
            try:
                pred, rec = predict(model, data, handle=h)
                kept = int(h.last_stats.visual_tokens_kept[0])
            finally:
                h.remove()
            res["rows"].append({"strategy": name, "keep": keep, "kept": kept,
                                "accuracy": (pred == data["answers"]).float().mean().item(), "object_recall": rec})
    return res


def table(res: dict[str, Any], header: str, metric: str = "object_recall") -> str:
    """Markdown: one line of ``header`` (summary), then accuracy (%) per strategy x keep ratio with
    ``metric`` (a share) in brackets."""
    keeps = sorted({r["keep"] for r in res["rows"]}, reverse=True)
    kept = {r["keep"]: r["kept"] for r in res["rows"]}
    head = " | ".join(f"{k:g} ({kept[k]})" for k in keeps)
    lines = [header, "", f"| strategy | {head} |", "|---|" + "---|" * len(keeps)]
    for name in dict.fromkeys(r["strategy"] for r in res["rows"]):
        cells = []
        for k in keeps:
            r = next(x for x in res["rows"] if x["strategy"] == name and x["keep"] == k)
            cells.append(f"{100 * r['accuracy']:.1f} ({100 * r[metric]:.0f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(res: dict[str, Any], what: str) -> str:
    """"Model `x`; n <what>; unpruned accuracy **a%** (per type)."."""
    return (f"Model `{Path(res['model']).name}`; {res['n']} {what}; unpruned accuracy "
            f"**{100 * res['unpruned']:.1f}%** (" + ", ".join(f"{t} {100 * v:.0f}%" for t, v in
                                                        res["unpruned_by_type"].items()) + ").")


def to_markdown(res: dict[str, Any]) -> str:
    return table(res, summary(res, "test questions") + "\n\nAccuracy (%) by keep ratio (tokens kept of "
                 f"{res['tokens']}); object recall in brackets.")


def accuracy_plot(res: dict[str, Any], path: Path, xlabel: str, title: str) -> None:
    """Accuracy vs tokens kept (log x), one line per strategy, the unpruned accuracy dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["strategy"] for r in res["rows"]):
        pts = sorted((r["kept"], 100 * r["accuracy"]) for r in res["rows"] if r["strategy"] == name)
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(100 * res["unpruned"], color="grey", ls=":", label="unpruned")
    ax.set(xscale="log", xlabel=xlabel, ylabel="accuracy %", title=title)
    ticks = sorted({r["kept"] for r in res["rows"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot(res: dict[str, Any], path: Path) -> None:
    accuracy_plot(res, path, f"visual tokens kept (of {res['tokens']})",
                  f"fidelity on synthetic VQA ({res['n']} questions)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="tokenprune fidelity", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    ap.add_argument("--out", type=Path, default=Path("eval/results"))
    a = ap.parse_args(argv)
    res = run(a.model, a.n, tuple(a.strategies))
    md = to_markdown(res)
    print(md)
    save_results(res, md, a.out, "fidelity", plot)
    return res


if __name__ == "__main__":
    main()
