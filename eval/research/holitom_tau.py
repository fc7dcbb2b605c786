"""HoliTom's static threshold tau on the tiny video model: is a changing cell "static"?

    python -m eval.research.holitom_tau [--n 100] [--out eval/research/results]

HoliTom's outer stage calls a cell static over a window when the cosine similarity of its features
between consecutive frames stays above tau (official: 0.8, 0.65 at keep <= 0.1, set on
LLaVA-OV-7B), and averages it over the window. This measures (1) that similarity on the features the
outer stage compares (pooled, projected) at cells whose pixels change vs cells that do not, and (2)
HoliTom w/o M at a few (keep, tau) pairs: accuracy, and what became of the changed tokens —
*covered* (kept, or merged over time at their cell: what the event recall credits), *merged
elsewhere* (into a token at another cell), *dropped*.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import tokenprune
from tokenprune.eval.results_io import save_results
from tokenprune.eval.synthetic.clips import FRAMES, clip_split, render_clips
from tokenprune.eval.synthetic.fidelity_video import TEST_SEED, load, predict, prepare
from tokenprune.eval.tiny import ov_pooled_side

from .probe_video import PROBE_SEED
from .probe_video import features as probe_features

#: (keep, tau): the official thresholds at 0.111 / 0.056 and higher ones
SETTINGS = ((0.111, None), (0.111, 0.9), (0.111, 0.95), (0.056, None), (0.056, 0.95))


@torch.no_grad()
def frame_similarity(model: Any, n: int) -> dict[str, list[float]]:
    """5 / 50 / 95% quantiles of the consecutive-frame cosine similarity of the video tokens at the
    LLM's input (the pooled, projected features the outer stage compares; the probe's clips), at
    cells whose pixels change between the two frames and at the others."""
    _, emb, _ = probe_features(model, n)                                   # [n, F * cells, d]
    frames, _ = render_clips([s.clip for s in clip_split(n, PROBE_SEED)])
    cells = emb.shape[1] // FRAMES
    f = emb.reshape(n, FRAMES, cells, -1)
    sim = torch.nn.functional.cosine_similarity(f[:, 1:], f[:, :-1], dim=-1)          # [n, F-1, cells]
    px = torch.nn.functional.adaptive_avg_pool2d(frames.flatten(0, 1), int(cells ** 0.5))
    px = px.reshape(n, FRAMES, 3, cells)
    changed = (px[:, 1:] - px[:, :-1]).abs().amax(2) > 1e-3
    q = torch.tensor([0.05, 0.5, 0.95])
    return {"changed": torch.quantile(sim[changed], q).tolist(), "unchanged": torch.quantile(sim[~changed], q).tolist()}


def sweep(model: Any, processor: Any, n: int, settings: tuple = SETTINGS) -> list[dict[str, Any]]:
    """HoliTom w/o M at each (keep, tau) on ``n`` test clips (tau None: the official default)."""
    data = prepare(processor, clip_split(n, TEST_SEED), ov_pooled_side(model.config.vision_config))
    rows = []
    for keep, tau in settings:
        h = tokenprune.apply(model, "holitom", keep=keep, inner_merge=False, **({} if tau is None else {"tau": tau}))
        try:
            pred, _, fates = predict(model, data, handle=h)
        finally:
            h.remove()
        share = fates / max(fates.sum(), 1)
        acc = (pred == data["answers"]).float().mean().item()
        rows.append({"keep": keep, "tau": h.config.threshold(), "accuracy": acc,
                     "covered": share[0], "merged elsewhere": share[1], "dropped": share[2]})
    return rows


def run(model_path: str | Path | None = None, n: int = 100, settings: tuple = SETTINGS) -> dict[str, Any]:
    import transformers

    from tokenprune.eval.bench.run import machine

    model, processor = load(model_path)
    return {"machine": f"{machine('cpu')}, torch {torch.__version__}, transformers {transformers.__version__}",
            "n": n, "similarity_clips": min(n, 24), "similarity": frame_similarity(model, min(n, 24)),
            "holitom_wo_m": sweep(model, processor, n, settings)}


def to_markdown(res: dict[str, Any]) -> str:
    sim = res["similarity"]
    lines = [f"HoliTom's static threshold on the tiny video model ({res['machine']}).", "",
             "Cosine similarity of consecutive frames' video tokens at the LLM input "
             f"({res['similarity_clips']} clips), "
             "5 / 50 / 95% quantiles: cells whose pixels change "
             + " / ".join(f"{v:.3f}" for v in sim["changed"]) + "; unchanged cells "
             + " / ".join(f"{v:.3f}" for v in sim["unchanged"]) + ".", "",
             f"HoliTom w/o M on {res['n']} test clips; what became of the changed tokens (share):", "",
             "| keep | tau | accuracy | covered | merged elsewhere | dropped |", "|---|---|---|---|---|---|"]
    for r in res["holitom_wo_m"]:
        lines.append(f"| {r['keep']} | {r['tau']} | {100 * r['accuracy']:.1f} | {r['covered']:.3f} | "
                     f"{r['merged elsewhere']:.3f} | {r['dropped']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m eval.research.holitom_tau",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a saved video model folder (default: assets/tiny-ov-video)")
    ap.add_argument("--n", type=int, default=100, help="test clips")
    ap.add_argument("--out", type=Path, default=Path("eval/research/results"))
    a = ap.parse_args(argv)
    res = run(a.model, a.n)
    save_results(res, to_markdown(res), a.out, "holitom_tau_video")
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
