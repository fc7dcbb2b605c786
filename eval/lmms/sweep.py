"""A grid of strategies x budgets through lmms-eval on one loaded model, with a progress bar; writes
a markdown table and a plot (score vs visual tokens kept, one line per strategy).

    tokenprune sweep --model assets/tiny-llava-vqa --tasks tokenprune_vqa \\
        --strategies hiprune visionzip random --keeps 0.333 0.111 --out ./tokenprune_out/sweep

The model is loaded once (``strategy=none``); each grid point applies a strategy to it, runs
``lmms_eval.evaluator.simple_evaluate`` and removes the strategy. Local tasks of this package are
always on the include path; add others with ``--include_path``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from tokenprune._extras import default_out, first_paragraph, require_all

from ..results_io import save_results

# a sweep reads local tasks and checkpoints: never reach the hub unless the caller set these to 0
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _score(task_result: dict[str, Any]) -> tuple[str, float]:
    for k, v in task_result.items():
        if "," in k and "stderr" not in k and isinstance(v, (int, float)):
            return k.split(",")[0], float(v)
    raise ValueError(f"no metric in {task_result}")


def sweep(model: str, tasks: list[str], strategies: list[str], keeps: list[float], include_path: list[str],
          limit: int | None = None, batch_size: int = 1, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from tqdm import tqdm

    import tokenprune
    from tokenprune.eval.tasks import include_path as local_tasks

    from .model import TokenPruneChat

    lm = TokenPruneChat(pretrained=model, strategy="none", device=device, dtype=dtype, batch_size=batch_size)
    lm.keep_loaded = True             # one load for the whole grid
    tm = TaskManager(include_path=[str(local_tasks()), *include_path], include_defaults=False)
    grid = [("none", 1.0)] + [(s, k) for s in strategies for k in keeps]
    rows = []
    for name, keep in tqdm(grid, desc="sweep"):
        lm.handle = tokenprune.apply(lm.model, name, keep=keep) if name != "none" else None
        try:
            out = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, batch_size=batch_size,
                                 device=device, log_samples=False, verbosity="WARNING")
        finally:
            if lm.handle is not None:
                lm.handle.remove()
            lm.handle = None
        thr = out.get("throughput", {})
        # token totals are over every request of the call (all tasks): mean per sample
        n = sum(v.get("effective", 0) for v in out.get("n-samples", {}).values()) or 1
        for task in tasks:
            metric, value = _score(out["results"][task])
            rows.append({"strategy": name, "keep": keep, "task": task, "metric": metric, "score": value,
                         "visual_tokens_kept": thr.get("avg_visual_tokens_kept", float("nan")) / n,
                         "visual_tokens_in": thr.get("avg_visual_tokens_in", float("nan")) / n,
                         "ttft_ms": thr.get("avg_mean_ttft_ms")})
    return {"model": model, "tasks": tasks, "limit": limit, "rows": rows}


def _label(model: str) -> str:
    """A local checkpoint by its folder name (no machine's absolute path in a table), a hub id as is."""
    return Path(model).name if Path(model).exists() else model


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"Model `{_label(res['model'])}`; lmms-eval tasks {res['tasks']}" + (f", limit {res['limit']}" if res["limit"] else ""),
             "", "| strategy | keep | task | metric | score | visual tokens kept / in (mean) | TTFT ms (mean) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['strategy']} | {r['keep']:g} | {r['task']} | {r['metric']} | {r['score']:.3f} | "
                     f"{r['visual_tokens_kept']:.0f} / {r['visual_tokens_in']:.0f} | {r['ttft_ms'] or float('nan'):.1f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = res["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in res["rows"] if r["task"] == task]
        base = next(r for r in rows if r["strategy"] == "none")
        for name in dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != "none"):
            pts = sorted((r["visual_tokens_kept"], r["score"]) for r in rows if r["strategy"] == name)
            pts.append((base["visual_tokens_kept"], base["score"]))
            ax.plot(*zip(*sorted(pts)), marker="o", label=name)
        ax.axhline(base["score"], color="grey", ls=":", label="unpruned")
        ax.set(xlabel="visual tokens kept per sample", ylabel=base["metric"], title=task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


#: what a sweep imports beyond the core install (module, extra)
NEEDS = (("lmms_eval", "eval"), ("tqdm", "eval"), ("matplotlib", "eval"))


def parser() -> argparse.ArgumentParser:
    from tokenprune.runner import DEFAULT_MODEL

    ap = argparse.ArgumentParser(prog="tokenprune sweep", description=first_paragraph(__doc__),
                                 epilog="Writes sweep.json, sweep.md and sweep.png to --out.")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), metavar="PATH",
                    help="checkpoint folder or hub id (default: assets/tiny-llava-vqa)")
    ap.add_argument("--tasks", nargs="+", default=["tokenprune_vqa"], metavar="TASK",
                    help="lmms-eval task names (default: tokenprune_vqa, this package's synthetic VQA task)")
    ap.add_argument("--strategies", nargs="+", default=["hiprune", "visionzip", "fastv", "random"], metavar="NAME",
                    help="strategies of the grid (default: hiprune visionzip fastv random; unpruned always runs)")
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.333, 0.111], metavar="KEEP",
                    help="keep ratios of the grid (default: 0.333 0.111)")
    ap.add_argument("--include_path", nargs="*", default=[], metavar="DIR",
                    help="more lmms-eval task folders (this package's tasks are always included)")
    ap.add_argument("--limit", type=int, metavar="N", help="samples per task (default: all)")
    ap.add_argument("--batch_size", type=int, default=1, metavar="N", help="samples per batch (default: 1)")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                    help="weights' dtype (default: float32)")
    ap.add_argument("--out", type=Path, metavar="DIR", help="results folder (default: ./tokenprune_out/sweep)")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    require_all("tokenprune sweep", *NEEDS)
    out = a.out or default_out("sweep")
    res = sweep(a.model, a.tasks, a.strategies, a.keeps, a.include_path, a.limit, a.batch_size, a.device, a.dtype)
    md = to_markdown(res)
    print(md)
    save_results(res, md, out, "sweep", plot)
    print(f"sweep: wrote sweep.json, sweep.md and sweep.png to {out}")
    return res


if __name__ == "__main__":
    main()
