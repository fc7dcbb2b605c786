"""Markdown tables and plots of a benchmark result (``bench_<preset>.{json,md}``, ``*_ttft.png``,
``*_overhead.png``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .sanity import NOISY_OTHERS, NOISY_SPREAD, paired_flags


def _f(x: Any, nd: int = 1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _med(r: dict[str, Any], key: str, nd: int = 1) -> str:
    """``median (min–max)`` of a timing with a range, else the value alone."""
    lo_hi = r.get(f"{key}_range")
    return f"{_f(r.get(key), nd)} ({_f(lo_hi[0], nd)}–{_f(lo_hi[1], nd)})" if lo_hi else _f(r.get(key), nd)


def _name(r: dict[str, Any]) -> str:
    mark = "⚠ " if r.get("sanity") else "≈ " if r.get("noisy") else ""
    return mark + r["model"]


def _header(res: dict[str, Any]) -> list[str]:
    lines = [f"Machine: **{res['machine']}**; torch {res['torch']}, transformers {res['transformers']}; "
             f"preset `{res.get('preset', '?')}`; medians of {res['repeats']} after {res['warmup']} warm-up "
             "(min–max of the repeats in brackets); random weights (timing does not depend on them).", ""]
    if res.get("memory"):
        lines += [f"Peak MB: {res['memory']}. Decode tok/s: {res.get('decode', 'greedy generate')} "
                  f"({res['decode_tokens']} new tokens asked per call). {res.get('gc', '').capitalize()}.", ""]
    others = res.get("others_cpu")
    if others is not None and others >= NOISY_OTHERS:
        lines += [f"Note: other processes used {100 * others:.0f}% of the machine's {res.get('cpus', '?')} CPUs during "
                  "the run: the timings include their work (rows measured meanwhile are marked ≈).", ""]
    lines += [line for n in res.get("notes", []) for line in (f"Note: {n}", "")]
    return lines + ["TTFT = one forward over the prompt to the first logits. *ideal* = the unpatched model fed only "
                    "the kept visual tokens. *overhead* = (pruned − ideal) / unpruned TTFT. ⚠ = the row fails a "
                    "sanity check (listed below the tables): its numbers are not to be trusted. ≈ = noisy: other processes used "
                    f"≥ {100 * NOISY_OTHERS:.0f}% of the CPUs while it was measured, or a TTFT's repeats spread over "
                    f"{NOISY_SPREAD:.0f}x (reasons in the JSON, `noisy`). *paired* = the same three TTFTs timed "
                    "again in interleaved rounds (each round runs unpruned, pruned and ideal once, order rotated; "
                    "warm-up until stable): the ratios to trust on a busy machine; rows whose ideal is not faster "
                    "than unpruned there are listed below the table.", ""]


def _row(r: dict[str, Any]) -> str:
    dec = (f"{_med(r, 'decode_tok_s', 0)} / {_med(r, 'unpruned_decode_tok_s', 0)}"
           if "decode_tok_s" in r else "–")
    return (f"| {_name(r)} | {r['batch']} | {r['strategy']} | {r['kept']}/{r['tokens_in']} | {_med(r, 'ttft_ms')} | "
            f"{_med(r, 'unpruned_ttft_ms')} | {_med(r, 'ideal_ttft_ms')} | {_f(r['pruned_over_unpruned'], 2)} | "
            f"{_f(r['pruned_over_ideal'], 3)} | {_paired(r)} | {100 * r['overhead_share']:.1f}% | "
            f"{_f(r['vision_ms'])} / {_f(r['unpruned_vision_ms'])} | {_f(r['prune_ms'], 2)} | "
            f"{_f(r['llm_ms'])} / {_f(r['unpruned_llm_ms'])} | {dec} | {_f(r['peak_mb'], 0)} / "
            f"{_f(r['unpruned_peak_mb'], 0)} | {_f(r['kv_mb'], 1)} / {_f(r['unpruned_kv_mb'], 1)} | "
            f"{_f(r['flops_ratio'], 2)} |")


def _paired(r: dict[str, Any]) -> str:
    if "paired_pruned_over_unpruned" not in r:
        return "–"                                   # results written before the paired rounds
    return f"{_f(r['paired_pruned_over_unpruned'], 2)}, {_f(r['paired_pruned_over_ideal'], 3)}"


def _flagged(res: dict[str, Any]) -> list[str]:
    """The rows failing sanity checks, with the rules they break."""
    bad = [(r, f"{r['model']} bs={r['batch']} {r['strategy']} kept={r['kept']}") for r in res["rows"] if r.get("sanity")]
    bad += [(v, f"vision: {v['model']} bs={v['batch']} {v['strategy']}") for v in res.get("vision_rows", [])
            if v.get("sanity")]
    if not bad:
        return []
    return ["", "**Rows failing a sanity check** (kept, flagged ⚠, not to be trusted):", "",
            *[f"- {where}: {'; '.join(r['sanity'])}" for r, where in bad]]


def to_markdown(res: dict[str, Any]) -> str:
    lines = [*_header(res),
             "| model | bs | strategy | kept/in | TTFT ms pruned | unpruned | ideal | pruned/unpruned | "
             "pruned/ideal | paired: pruned/unpruned, pruned/ideal | overhead | vision ms (patched / plain) | prune ms | "
             "LLM ms (pruned / unpruned) | decode tok/s (pruned / unpruned) | peak MB (pruned / unpruned) | KV MB | FLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             *[_row(r) for r in res["rows"]]]
    unsure = [r for r in res["rows"] if paired_flags(r)]
    if unsure:
        lines += ["", "Rows whose paired rounds cannot separate the configurations (their ratios mean nothing):", "",
                  *[f"- {r['model']} bs={r['batch']} {r['strategy']} kept={r['kept']}: {'; '.join(paired_flags(r))}"
                    for r in unsure]]
    n_noisy = sum(bool(r.get("noisy")) for r in res["rows"])
    if n_noisy:
        lines += ["", f"≈ {n_noisy} of {len(res['rows'])} rows noisy (why: `noisy` in the JSON)."]
    if res.get("vision_rows"):
        lines += ["", "Vision tower + selection: SDPA alone vs our q/k capture vs the official-style eager "
                  "tower with `output_attentions=True` (same `select`); *agreement* = share of the "
                  "official-style kept tokens we keep too.", "",
                  "| model | bs | strategy | kept | SDPA ms | ours ms (overhead) | official-style ms (overhead) "
                  "| agreement |", "|---|---|---|---|---|---|---|---|"]
        for v in res["vision_rows"]:
            lines.append(f"| {_name(v)} | {v['batch']} | {v['strategy']} | {v['kept']} | {_f(v['sdpa_ms'])} | "
                         f"{_f(v['ours_ms'])} ({100 * v['ours_overhead']:+.0f}%) | {_f(v['official_ms'])} "
                         f"({100 * v['official_overhead']:+.0f}%) | {100 * v['agreement']:.0f}% |")
    lines += _flagged(res)
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


def write(res: dict[str, Any], out: Path, stem: str) -> tuple[str, list[Path]]:
    """Write ``stem``.json, .md and (with rows) the plots into ``out``; the markdown and the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(res)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(res, indent=1))
    paths[1].write_text(md)
    if res["rows"]:
        paths += plot(res, out, stem)
    return md, paths
