"""Capture overhead (issue 26, goal 3): the vision tower with our q/k capture + selection against the
same SDPA tower alone, at batch 1 and the preset's capture batch (8), for the LLaVA-1.5 preset of
``--preset`` (``cpu``: llava-mid; ``gpu``: the 7B geometry), plus the reduction alone (the
received-attention sum of one layer) against one layer's SDPA attention at that shape.

    python -m eval.bench.capture --preset cpu --out eval/results/capture_cpu

Columns are timed in interleaved rounds (:func:`eval.bench.timing.interleaved`). Writes ``capture.json`` and ``capture.md`` (machine named).
Goal: ``ours`` ≤ 1.10 × SDPA at batch 8."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenprune.api import family_for
from tokenprune.attention import vision_reductions

from .presets import PRESETS, build
from .run import Patched, _inputs, machine
from .timing import interleaved, paired_stats

STRATEGIES = ("hiprune", "fopru", "visionzip")


def run(preset: str, device: str, batches: tuple[int, ...], rounds: int | None) -> dict[str, Any]:
    bp = PRESETS[preset]
    mp = next(m for m in bp.models if m.family == "llava" and not m.video_frames)
    rounds = rounds or 2 * bp.repeats
    model = build(mp, device)
    family = family_for(model)
    core, vc = model.model, model.config.vision_config
    vision_rows, reductions = [], []
    with torch.no_grad():
        for batch in batches:
            px = _inputs(mp, model, family, batch, device)["pixel_values"]
            plain = lambda px=px: core.get_image_features(pixel_values=px)  # noqa: E731
            fns: dict[str, Callable[[], Any]] = {"sdpa": plain}
            fns.update({s: Patched(model, s, {"budget": mp.budgets[0]}, plain) for s in STRATEGIES})
            st = paired_stats(interleaved(fns, device, rounds, bp.warmup))
            for s in STRATEGIES:
                vision_rows.append({"batch": batch, "strategy": s, "kept": mp.budgets[0], "sdpa_ms": st["sdpa_ms"],
                                    "ours_ms": st[f"{s}_ms"], "sdpa_range": st["sdpa_ms_range"],
                                    "ours_range": st[f"{s}_ms_range"], "ours_overhead": st[f"{s}_ms"] / st["sdpa_ms"] - 1})
            # one layer's reduction vs that layer's SDPA attention, same shapes
            g = torch.Generator(device="cpu").manual_seed(0)
            n, heads = (vc.image_size // vc.patch_size) ** 2 + 1, vc.num_attention_heads
            q, k = (torch.randn(batch, n, vc.hidden_size, generator=g).to(device) for _ in range(2))
            qh, kh = (x.reshape(batch, n, heads, -1).transpose(1, 2) for x in (q, k))
            scale = (vc.hidden_size // heads) ** -0.5
            red = interleaved({"sdpa_attention": lambda qh=qh, kh=kh: F.scaled_dot_product_attention(qh, kh, kh),
                                "reduction": lambda q=q, k=k, h=heads, sc=scale: vision_reductions(q, k, h, sc, {"mean"})},
                               device, rounds, bp.warmup)
            st = paired_stats(red)
            reductions.append({"batch": batch, "tokens": n, "heads": heads, "sdpa_attention_ms": st["sdpa_attention_ms"],
                               "reduction_ms": st["reduction_ms"], "sdpa_attention_range": st["sdpa_attention_ms_range"],
                               "reduction_range": st["reduction_ms_range"],
                               "overhead": st["reduction_ms"] / st["sdpa_attention_ms"] - 1})
    return {"machine": machine(device), "device": device, "torch": torch.__version__, "model": mp.name,
            "rounds": rounds, "warmup": bp.warmup, "vision_rows": vision_rows, "reduction_rows": reductions}


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"# Capture overhead — {res['model']}", "", f"Machine: {res['machine']}; torch {res['torch']}; "
             f"median of {res['rounds']} interleaved rounds (each round times every column once, order rotated) "
             f"after {res['warmup']} warm-up round(s); ranges are min–max.", "",
             "Vision tower: SDPA alone vs SDPA + our q/k capture + selection.", "",
             "| bs | strategy | kept | SDPA ms (range) | ours ms (range) | overhead |", "|---|---|---|---|---|---|"]
    for v in res["vision_rows"]:
        lines.append(f"| {v['batch']} | {v['strategy']} | {v['kept']} | {v['sdpa_ms']:.1f} ({_r(v['sdpa_range'])}) | "
                     f"{v['ours_ms']:.1f} ({_r(v['ours_range'])}) | {100 * v['ours_overhead']:+.1f}% |")
    lines += ["", "One layer: the received-attention sum (blockwise, float32) vs that layer's SDPA attention.", "",
              "| bs | tokens | heads | SDPA attention ms | reduction ms | ratio | reduction / SDPA tower |",
              "|---|---|---|---|---|---|---|"]
    tower = {v["batch"]: v["sdpa_ms"] for v in res["vision_rows"]}
    for r in res["reduction_rows"]:
        lines.append(f"| {r['batch']} | {r['tokens']} | {r['heads']} | {r['sdpa_attention_ms']:.1f} | "
                     f"{r['reduction_ms']:.1f} | {r['reduction_ms'] / r['sdpa_attention_ms']:.2f} | "
                     f"{100 * r['reduction_ms'] / tower[r['batch']]:.1f}% |")
    lines += ["", "The last column is the cost of one captured layer measured on its own, so it holds where the "
              "tower-level overhead is inside the rounds' spread."]
    return "\n".join(lines) + "\n"


def _r(r: list[float]) -> str:
    return f"{r[0]:.1f}–{r[1]:.1f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["tiny", "cpu", "gpu"], default="cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 and the preset's capture batch")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: twice the preset's repeats)")
    p.add_argument("--out", type=Path, default=Path("tokenprune_out/capture"))
    a = p.parse_args(argv)
    batches = tuple(a.batches or sorted({1, PRESETS[a.preset].capture_batch or 1}))
    res = run(a.preset, a.device, batches, a.rounds)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "capture.json").write_text(json.dumps(res, indent=1))
    (a.out / "capture.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
