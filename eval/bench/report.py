"""Markdown tables and plots of a benchmark result (``bench_<preset>.{json,md}``, ``*_ttft.png``,
``*_overhead.png``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(x: Any, nd: int = 1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"Machine: **{res['machine']}**; torch {res['torch']}, transformers {res['transformers']}; "
             f"preset `{res.get('preset', '?')}`; medians of {res['repeats']} after {res['warmup']} warm-up; "
             "random weights (timing does not depend on them).", "",
             *[line for n in res.get("notes", []) for line in (f"Note: {n}", "")],
             "TTFT = one forward over the prompt to the first logits. *ideal* = the unpatched model fed only "
             "the kept visual tokens. *overhead* = (pruned − ideal) / unpruned TTFT.", "",
             "| model | bs | strategy | kept/in | TTFT ms pruned | unpruned | ideal | pruned/unpruned | "
             "pruned/ideal | overhead | vision ms (patched / plain) | prune ms | LLM ms (pruned / unpruned) | "
             "decode tok/s (pruned / unpruned) | peak MB (pruned / unpruned) | KV MB | FLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        dec = (f"{_f(r.get('decode_tok_s'), 0)} / {_f(r.get('unpruned_decode_tok_s'), 0)}"
               if r.get("decode_tok_s") else "–")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['strategy']} | {r['kept']}/{r['tokens_in']} | {_f(r['ttft_ms'])} | "
            f"{_f(r['unpruned_ttft_ms'])} | {_f(r['ideal_ttft_ms'])} | {_f(r['pruned_over_unpruned'], 2)} | "
            f"{_f(r['pruned_over_ideal'], 3)} | {100 * r['overhead_share']:.1f}% | "
            f"{_f(r['vision_ms'])} / {_f(r['unpruned_vision_ms'])} | {_f(r['prune_ms'], 2)} | "
            f"{_f(r['llm_ms'])} / {_f(r['unpruned_llm_ms'])} | {dec} | {_f(r['peak_mb'], 0)} / "
            f"{_f(r['unpruned_peak_mb'], 0)} | {_f(r['kv_mb'], 1)} / {_f(r['unpruned_kv_mb'], 1)} | "
            f"{_f(r['flops_ratio'], 2)} |")
    if res.get("vision_rows"):
        lines += ["", "Vision tower + selection: SDPA alone vs our q/k capture vs the official-style eager "
                  "tower with `output_attentions=True` (same `select`); *agreement* = share of the "
                  "official-style kept tokens we keep too.", "",
                  "| model | bs | strategy | kept | SDPA ms | ours ms (overhead) | official-style ms (overhead) "
                  "| agreement |", "|---|---|---|---|---|---|---|---|"]
        for v in res["vision_rows"]:
            lines.append(f"| {v['model']} | {v['batch']} | {v['strategy']} | {v['kept']} | {_f(v['sdpa_ms'])} | "
                         f"{_f(v['ours_ms'])} ({100 * v['ours_overhead']:+.0f}%) | {_f(v['official_ms'])} "
                         f"({100 * v['official_overhead']:+.0f}%) | {100 * v['agreement']:.0f}% |")
    if res.get("interrupted"):
        lines += ["", "**Interrupted** (time limit): the table holds the cases measured before it."]
    if res.get("errors"):
        lines += ["", "Cases that failed (the run went on without them):", ""]
        lines += [f"- {e['model']} {e.get('strategy', '')} bs={e.get('batch', '')} budget={e.get('budget', '')}: "
                  f"`{e['error'][:300]}`" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], out: Path, stem: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["batch"]) for r in res["rows"]})
    paths = []
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (model, batch) in zip(axes[0], groups):
        rows = [r for r in res["rows"] if (r["model"], r["batch"]) == (model, batch)]
        for name in sorted({r["strategy"] for r in rows}):
            pts = sorted((r["kept"], r["ttft_ms"]) for r in rows if r["strategy"] == name)
            ax.plot(*zip(*pts), marker="o", label=name)
        ideal = sorted({(r["kept"], r["ideal_ttft_ms"]) for r in rows})
        ax.plot(*zip(*ideal), "k--", marker="x", label="ideal (kept only)")
        ax.axhline(rows[0]["unpruned_ttft_ms"], color="grey", ls=":", label="unpruned")
        ax.set(title=f"{model}, batch {batch}", xlabel="visual tokens kept per image", ylabel="TTFT ms")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"time to first token vs tokens kept — {res['machine']}", fontsize=9)
    fig.tight_layout()
    paths.append(out / f"{stem}_ttft.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['strategy']}\n{r['kept']}@bs{r['batch']}" for r in res["rows"]]
    ax.bar(range(len(labels)), [100 * r["overhead_share"] for r in res["rows"]])
    ax.set_xticks(range(len(labels)), labels, fontsize=5, rotation=90)
    ax.set(ylabel="(pruned − ideal) / unpruned TTFT, %", title=f"selection overhead — {res['machine']}")
    fig.tight_layout()
    paths.append(out / f"{stem}_overhead.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def write(res: dict[str, Any], out: Path, stem: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(res)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(md)
    if res["rows"]:
        plot(res, out, stem)
    return md
