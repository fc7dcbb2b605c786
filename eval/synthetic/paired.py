"""Paired comparisons of two benchmark rows on the same questions.

Two strategies answer the *same* questions, so their accuracies are strongly correlated and the
unpaired standard error of either one (~1 point on 1,000 questions) overstates the noise of their
difference. What decides is the discordant questions: those one row gets right and the other wrong.

- difference of accuracies with a 95% interval from the per-question differences (normal
  approximation of the paired mean: d_i = right_a_i - right_b_i, se = sd(d) / sqrt(n));
- exact two-sided McNemar p-value: under "no difference" each discordant question is a fair coin.

Rows store their per-question results as a string of ``0``/``1`` (``"right"`` in the results JSON),
so comparisons can be redone from a saved run without the model.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def encode(ok: torch.Tensor) -> str:
    """[N] bool -> ``"0110..."`` (1 = right)."""
    return "".join("1" if x else "0" for x in ok.tolist())


def decode(bits: str) -> torch.Tensor:
    """``"0110..."`` -> [N] bool."""
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (binomial, p = 1/2)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Row a vs row b, both [N] bool (right per question, same questions in the same order) ->
    ``diff`` (accuracy a - b), ``lo``/``hi`` (95% interval), ``a_only``/``b_only`` (discordant
    counts), ``p`` (exact McNemar)."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"paired rows need the same questions: got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.double() - b.double()
    n = d.numel()
    se = d.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    diff = d.mean().item()
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    return {"diff": diff, "lo": diff - 1.96 * se, "hi": diff + 1.96 * se, "a_only": a_only, "b_only": b_only,
            "p": mcnemar_p(a_only, b_only)}


def row_right(res: dict[str, Any], strategy: str, keep: float) -> torch.Tensor:
    """Per-question results of one row of a saved run (``"unpruned"`` = the unpatched model)."""
    if strategy == "unpruned":
        return decode(res["unpruned_right"])
    for r in res["rows"]:
        if r["strategy"] == strategy and abs(r["keep"] - keep) < 1e-9:
            return decode(r["right"])
    raise KeyError(f"no row {strategy!r} at keep {keep:g} in this run")


def comparisons(res: dict[str, Any], pairs: tuple[tuple[str, str], ...], keeps: tuple[float, ...]
                ) -> list[dict[str, Any]]:
    """Every (a, b) of ``pairs`` at every keep ratio present in the run -> one dict per comparison
    (``a``, ``b``, ``keep`` and the fields of :func:`compare`). Pairs naming a missing row are skipped."""
    out = []
    for keep in keeps:
        for a, b in pairs:
            try:
                right_a, right_b = row_right(res, a, keep), row_right(res, b, keep)
            except KeyError:            # a row this run did not measure (e.g. --strategies subset)
                continue
            out.append({"a": a, "b": b, "keep": keep, **compare(right_a, right_b)})
    return out


def to_markdown(comps: list[dict[str, Any]], n: int) -> str:
    """Table of paired comparisons (points, 95% interval, discordant counts, McNemar p)."""
    intro = (f"Paired comparisons on the same {n} questions: difference of accuracy (points) with a 95% "
             "interval, the questions only one row gets right, and the exact McNemar p-value.")
    lines = [intro, "",
             "| keep | a vs b | a − b (points) | 95% interval | right only in a / only in b | p |",
             "|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c['keep']:g} | {c['a']} vs {c['b']} | {100 * c['diff']:+.1f} | "
                     f"[{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] | {c['a_only']} / {c['b_only']} | "
                     f"{c['p']:.3g} |")
    return "\n".join(lines) + "\n"
