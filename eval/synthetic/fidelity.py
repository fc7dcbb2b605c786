"""Fidelity benchmark: answer accuracy of every strategy vs visual tokens kept, on the trained tiny
VQA model loaded with ``from_pretrained`` and fed through its real processor.

    tokenprune fidelity [--model assets/tiny-llava-vqa] [--n 1000] [--out ./tokenprune_out/fidelity]
    tokenprune fidelity --video ...      (the video benchmark: fidelity_video.py)

Second metric, deterministic: *object recall* = share of the patches covered by an object that a
strategy keeps (what the answer needs; random keeps the keep ratio).

Two controls (not strategies) say how much the model's answers depend on *which* tokens it sees:
``objects first`` keeps the object-covered patches (then random background up to the budget),
``background only`` keeps random background patches and never an object. Both run the unpatched
model with the dropped visual tokens masked out (original positions: what a pruned forward sees).
If ``background only`` answers as well as ``objects first``, the tower has spread the answer into
every token and no selection can matter.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import tokenprune
from tokenprune._extras import default_out, first_paragraph, require_all
from tokenprune.runner import DEFAULT_MODEL, user_prompt

from ..results_io import save_results
from . import paired
from .scenes import render, to_pil
from .splits import Sample, split

KEEPS = (1.0, 0.5, 0.333, 0.222, 0.111, 0.056)
#: rows: a strategy name, or ``name:param=value[,param=value]``. FastV's paper K = 2 is 2 of 32 LLM
#: layers; on this 4-layer LLM it leaves half the LLM seeing every token, so K = 1 is the closer row.
STRATEGIES = ("hiprune", "visionzip", "fopru", "fastv", "fastv:layer=1", "random", "pool", "holitom_inner", "divprune",
              "vispruner", "prumerge", "dart", "dart:layer=1", "pdrop", "sparsevlm", "cdpruner")
CONTROLS = ("objects first", "background only")
#: paired comparisons reported under the table (:mod:`.paired`): the issue's goals (HiPrune vs
#: unpruned; the papers' ordering HiPrune >= VisionZip > FastV, random, pool) and the object oracle
PAIRS = (("hiprune", "unpruned"), ("hiprune", "visionzip"), ("visionzip", "fastv (layer=1)"), ("visionzip", "fastv"),
         ("visionzip", "random"), ("visionzip", "pool"), ("objects first", "hiprune"),
         # the methods added in issue 27, each against the strongest row and against random
         ("divprune", "hiprune"), ("divprune", "random"), ("vispruner", "hiprune"), ("vispruner", "random"),
         ("prumerge", "hiprune"), ("prumerge", "random"),
         # the inner-LLM ones against FastV (the same kind of method) and random; CDPruner against
         # DivPrune (diversity without the instruction)
         ("dart", "fastv"), ("dart (layer=1)", "fastv (layer=1)"), ("dart", "random"), ("pdrop", "fastv"),
         ("sparsevlm", "fastv"), ("sparsevlm", "random"), ("cdpruner", "divprune"), ("cdpruner", "random"))
PAIR_KEEPS = (0.333, 0.111)


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


def parse_row(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``"fastv:layer=1"`` -> (label ``"fastv (layer=1)"``, strategy ``"fastv"``, ``{"layer": 1}``);
    a plain name is its own label with no parameters."""
    from tokenprune.config import parse_value

    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key] = parse_value(value)      # the CLI's own typing (int, float, bool, None, text)
    return (f"{name} ({rest})" if rest else name), name, params


def control_keep(objects: torch.Tensor, n_keep: int, control: str, seed: int = 0) -> torch.Tensor:
    """Keep masks of exactly ``n_keep`` tokens per sample. objects [N, T] bool -> [N, T] bool:
    ``objects first`` = the object patches (a random subset if there are more than ``n_keep``),
    then random background; ``background only`` = random background patches, never an object."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(objects.shape, generator=g)                  # [0, 1): ties broken at random
    sign = {"objects first": 2.0, "background only": -2.0}[control]
    order = (noise + sign * objects.float()).topk(n_keep, dim=1).indices
    return torch.zeros_like(objects).scatter_(1, order, True)


@torch.no_grad()
def predict_masked(model: Any, data: dict[str, Any], keep: torch.Tensor, batch: int = 64,
                   token_id: int | None = None) -> torch.Tensor:
    """Greedy first answer token of the unpatched model with the visual tokens not in ``keep``
    [N, T] masked out of attention (positions unchanged); T = the placeholder tokens of a row
    (``token_id``, default the image token)."""
    enc = data["inputs"]
    img = enc["input_ids"] == (model.config.image_token_id if token_id is None else token_id)
    mask = enc["attention_mask"].clone()
    mask[img] = keep.reshape(-1).to(mask.dtype)          # each row has its T image tokens in order
    preds = []
    for s in range(0, mask.shape[0], batch):
        part = {k: v[s:s + batch] for k, v in enc.items()}
        part["attention_mask"] = mask[s:s + batch]
        preds.append(model(**part, logits_to_keep=1).logits[:, -1].argmax(-1))
    return torch.cat(preds)


def control_run(model: Any, data: dict[str, Any], relevant: torch.Tensor, control: str, keep: float,
                token_id: int | None = None, tail: int = 0, batch: int = 64) -> tuple[int, torch.Tensor, float]:
    """One control row: relevant [N, T] bool (object / changed tokens) -> (tokens kept, right [N]
    bool, recall of the relevant tokens). ``tail`` placeholder tokens after the T (structure, e.g.
    OneVision's video newline) are always kept."""
    n, t = relevant.shape
    kept = t if keep >= 1.0 else round(keep * t)
    mask = control_keep(relevant, kept, control)
    full = torch.cat([mask, torch.ones(n, tail, dtype=torch.bool)], 1)
    ok = predict_masked(model, data, full, batch=batch, token_id=token_id) == data["answers"]
    recall = ((mask & relevant).sum(1) / relevant.sum(1).clamp(min=1)).mean().item()
    return kept, ok, recall


def by_type(ok: torch.Tensor, types: list[str]) -> dict[str, float]:
    """Accuracy per question type: ok [N] bool, types [N] -> {type: share right} (types sorted)."""
    return {t: ok[[x == t for x in types]].float().mean().item() for t in sorted(set(types))}


def run(model_path: str | Path = DEFAULT_MODEL, n: int = 1000, strategies: tuple[str, ...] = STRATEGIES,
        keeps: tuple[float, ...] = KEEPS, controls: tuple[str, ...] = CONTROLS) -> dict[str, Any]:
    from tqdm import tqdm

    model, processor = load(model_path)
    data = prepare(processor, split(n))
    n_tok = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n_tok *= n_tok
    pred, _ = predict(model, data)
    ok = pred == data["answers"]
    res: dict[str, Any] = {"model": str(model_path), "n": n, "tokens": n_tok, "unpruned": ok.float().mean().item(),
                           "unpruned_by_type": by_type(ok, data["types"]), "unpruned_right": paired.encode(ok),
                           "rows": []}
    for spec in tqdm(strategies, desc="fidelity"):
        label, name, params = parse_row(spec)
        for keep in keeps:
            if keep >= 1.0:
                res["rows"].append({"strategy": label, "keep": 1.0, "kept": n_tok, "accuracy": res["unpruned"],
                                    "object_recall": 1.0, "right": res["unpruned_right"]})
                continue
            h = tokenprune.apply(model, name, keep=keep, **params)
            try:
                pred, rec = predict(model, data, handle=h)
                kept = int(h.last_stats.visual_tokens_kept[0])
            finally:
                h.remove()
            ok = pred == data["answers"]
            res["rows"].append({"strategy": label, "keep": keep, "kept": kept, "accuracy": ok.float().mean().item(),
                                "object_recall": rec, "right": paired.encode(ok)})
    for name in controls:
        for keep in keeps:
            kept, ok, rec = control_run(model, data, data["objects"], name, keep)
            res["rows"].append({"strategy": name, "keep": keep, "kept": kept, "control": True,
                                "accuracy": ok.float().mean().item(), "object_recall": rec,
                                "right": paired.encode(ok)})
    return res


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with ``new``'s rows added or replacing the rows of the same (strategy, keep): how a
    benchmark gains rows without re-running the others. Refused unless both were run on the same
    questions with the same unpruned answers (what paired comparisons need)."""
    same = ("n", "tokens", "unpruned_right")
    if any(old.get(k) != new.get(k) for k in same):
        raise ValueError("the results to merge were not run on the same questions and model "
                         f"(they differ in {[k for k in same if old.get(k) != new.get(k)]})")
    fresh = {(r["strategy"], r["keep"]): r for r in new["rows"]}
    rows = [fresh.pop((r["strategy"], r["keep"]), r) for r in old["rows"]]
    added = list(fresh.values())
    n_strategies = sum(1 for r in rows if not r.get("control"))
    rows[n_strategies:n_strategies] = [r for r in added if not r.get("control")]   # strategies before controls
    rows += [r for r in added if r.get("control")]
    return {**old, "rows": rows}


def load_for_merge(path: Path | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` merged into the results file ``path`` (``--merge``), or ``new`` itself."""
    import json

    return new if path is None else merge_results(json.loads(Path(path).read_text()), new)


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
    note = ""
    if any(r.get("control") for r in res["rows"]):
        note = (" Rows *objects first* and *background only* are controls, not strategies: the unpatched "
                "model with the other visual tokens masked out (object patches first, then random "
                "background / random background only).")
    md = table(res, summary(res, "test questions") + "\n\nAccuracy (%) by keep ratio (tokens kept of "
               f"{res['tokens']}); object recall in brackets." + note)
    return md + paired_section(res, PAIRS)


def paired_section(res: dict[str, Any], pairs: tuple[tuple[str, str], ...],
                   keeps: tuple[float, ...] = PAIR_KEEPS) -> str:
    """The paired comparisons of ``pairs`` at ``keeps`` as markdown ('' for a run saved without
    per-question results)."""
    if "unpruned_right" not in res:
        return ""
    comps = paired.comparisons(res, pairs, keeps)
    return "\n" + paired.to_markdown(comps, res["n"]) if comps else ""


def accuracy_plot(res: dict[str, Any], path: Path, xlabel: str, title: str) -> None:
    """Accuracy vs tokens kept (log x), one line per strategy, the unpruned accuracy dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["strategy"] for r in res["rows"]):
        rows = [r for r in res["rows"] if r["strategy"] == name]
        pts = sorted((r["kept"], 100 * r["accuracy"]) for r in rows)
        control = any(r.get("control") for r in rows)        # controls: dashed, hollow markers
        ax.plot(*zip(*pts), marker="o", label=name, ls="--" if control else "-", mfc="none" if control else None)
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


#: what a fidelity run imports beyond the core install (module, extra)
NEEDS = (("tqdm", "eval"), ("matplotlib", "eval"))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tokenprune fidelity", description=first_paragraph(__doc__),
                                 epilog="Writes fidelity.json, fidelity.md and fidelity.png to --out.")
    ap.add_argument("--video", action="store_true",
                    help="the video benchmark instead: the tiny LLaVA-OneVision video model (assets/tiny-ov-video) "
                         "and the video strategies (HoliTom), 300 clips by default; its options: "
                         "tokenprune fidelity --video --help")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), metavar="PATH",
                    help="a saved tiny VQA LLaVA folder (default: assets/tiny-llava-vqa)")
    ap.add_argument("--n", type=int, default=1000, help="test questions (default: 1000)")
    ap.add_argument("--strategies", nargs="*", default=list(STRATEGIES), metavar="ROW",
                    help=f"rows: names, or name:param=value[,param=value] (default: {' '.join(STRATEGIES)})")
    add_common_options(ap, list(CONTROLS), "fidelity.json", "questions")
    return ap


def add_common_options(ap: argparse.ArgumentParser, controls: list[str], results: str, items: str) -> None:
    """--controls, --out and --merge, shared by the image and the video benchmark."""
    ap.add_argument("--controls", nargs="*", default=controls, metavar="NAME",
                    help=f"control rows, of {controls} (default: both; none given: no controls)")
    ap.add_argument("--out", type=Path, metavar="DIR", help="results folder (default: ./tokenprune_out/fidelity)")
    ap.add_argument("--merge", type=Path, metavar="JSON",
                    help=f"add the rows run now to this earlier {results} (same --n and model: the same "
                         f"{items}), replacing rows of the same strategy and keep; writes the merged results")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--video" in argv:       # one command, two benchmarks: the video one parses its own options
        from .fidelity_video import main as video_main

        return video_main([x for x in argv if x != "--video"])
    a = parser().parse_args(argv)
    require_all("tokenprune fidelity", *NEEDS)
    out = a.out or default_out("fidelity")
    res = load_for_merge(a.merge, run(a.model, a.n, tuple(a.strategies), controls=tuple(a.controls)))
    md = to_markdown(res)
    print(md)
    save_results(res, md, out, "fidelity", plot)
    print(f"fidelity: wrote fidelity.json, fidelity.md and fidelity.png to {out}")
    return res


if __name__ == "__main__":
    main()
