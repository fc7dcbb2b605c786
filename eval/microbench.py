"""CPU micro-benchmark: prune time of each strategy as a share of the unpruned prefill.

A mid-size random LLaVA-1.5 (CLIP 336 px / 14 -> 576 visual tokens, 12x256 vision, 8x512 LLM).
Everything is measured side by side in one run, medians over repeats:
unpruned prefill, pruned prefill, the ideal "LLM fed only the kept tokens" (vision + projector +
LLM on the kept sequence, no scoring), and the strategy's own prune time (``last_stats.prune_ms``).

    python -m tokenprune.eval.microbench --repeats 10 --keep 0.25 --out eval/results
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import tokenprune
from tokenprune.eval.tiny import mid_llava_config, prompt_ids


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def build(seed: int = 0):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration._from_config(mid_llava_config(), attn_implementation="sdpa").eval()


@torch.no_grad()
def run(repeats: int = 10, keep: float = 0.25, strategies: list[str] | None = None) -> dict:
    from tqdm import tqdm

    model = build()
    n_vis = 576
    ids = prompt_ids(n_vis, prefix=30, suffix=30, vocab=1024)
    px = torch.randn(1, 3, 336, 336)
    inputs = {"input_ids": ids, "pixel_values": px}
    core = model.model
    full = _timed(lambda: model(**inputs), repeats)
    rows = []
    for name in tqdm(strategies or tokenprune.list_strategies(), desc="strategies"):
        h = tokenprune.apply(model, name, keep=keep)
        prune_ms: list[float] = []

        def pruned() -> None:
            model(**inputs)
            prune_ms.append(h.last_stats.prune_ms)
        pruned_t = _timed(pruned, repeats)
        prune_ms = prune_ms[1:]
        st = h.last_stats
        keep_mask = ids[0] != model.config.image_token_id
        vis_pos = torch.nonzero(~keep_mask).flatten()
        keep_mask[vis_pos[st.kept_indices[0][0]]] = True
        h.remove()

        def ideal() -> None:  # vision + projector + the LLM fed only the kept tokens
            feats = core.get_image_features(pixel_values=px).pooler_output[0]
            emb = core.get_input_embeddings()(ids)
            emb = emb.masked_scatter((ids == model.config.image_token_id)[..., None], feats)
            hidden = core.language_model(inputs_embeds=emb[:, keep_mask]).last_hidden_state
            model.lm_head(hidden[:, -1:])
        ideal_t = _timed(ideal, repeats)
        med = statistics.median
        rows.append({"strategy": name, "kept": int(st.visual_tokens_kept[0]),
                     "prune_ms": med(prune_ms), "prefill_unpruned_ms": med(full),
                     "prefill_pruned_ms": med(pruned_t), "prefill_ideal_ms": med(ideal_t),
                     "prune_share_pct": 100 * med(prune_ms) / med(full),
                     "flops_ratio": st.flops_after / st.flops_before})
    return {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "repeats": repeats, "keep": keep, "visual_tokens": n_vis, "rows": rows}


def to_markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}; torch {res['torch']}, transformers {res['transformers']}; "
             f"keep={res['keep']} of {res['visual_tokens']} visual tokens; medians of {res['repeats']}.", "",
             "| strategy | kept | prune ms | prune / unpruned prefill | unpruned prefill ms | pruned prefill ms "
             "| ideal (LLM fed kept only) ms | FLOPs after/before |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['strategy']} | {r['kept']} | {r['prune_ms']:.2f} | {r['prune_share_pct']:.2f}% | "
                     f"{r['prefill_unpruned_ms']:.1f} | {r['prefill_pruned_ms']:.1f} | {r['prefill_ideal_ms']:.1f} | "
                     f"{r['flops_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--strategies", nargs="*")
    ap.add_argument("--out", type=Path, default=None, help="folder for microbench_cpu.{json,md}")
    a = ap.parse_args(argv)
    res = run(a.repeats, a.keep, a.strategies)
    md = to_markdown(res)
    print(md)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "microbench_cpu.json").write_text(json.dumps(res, indent=2))
        (a.out / "microbench_cpu.md").write_text(md)


if __name__ == "__main__":
    main()
