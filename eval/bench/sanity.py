"""Sanity rules for benchmark rows: bounds any honest measurement meets on any machine.

A row that breaks one is kept but flagged (``row["sanity"]``: the broken rules, empty if none), in
the JSON, the markdown and a printed warning: its numbers are not to be trusted, whatever they say.
Spread is a separate, softer signal (``row["noisy"]``): a sound measurement on a busy machine.
"""
from __future__ import annotations

import math
from typing import Any

#: No decode step of a transformer is shorter than 10 us on any device (a kernel launch alone takes
#: ~5 us, and a step launches a few per layer), so no row decodes faster than batch x 1e5 tok/s.
MAX_STEPS_PER_S = 1e5
#: A timing whose slowest repeat is this many times its fastest measured other work too.
NOISY_SPREAD = 2.0
#: Share of the machine's CPUs other processes used while a row was measured that marks it noisy.
NOISY_OTHERS = 0.25

_PREFIXES = ("", "unpruned_", "ideal_")
_POSITIVE = ("ttft_ms", "llm_ms", "vision_ms", "peak_mb", "kv_mb")
_RATIOS = ("pruned_over_unpruned", "pruned_over_ideal", "overhead_share", "flops_ratio")


def _positive(row: dict[str, Any], key: str) -> str | None:
    v = row.get(key)
    if v is None:
        return None                  # not measured for this row (e.g. no vision time for the ideal)
    if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return f"{key} = {v} (must be finite and > 0)"
    return None


def _decode(row: dict[str, Any], prefix: str, asked: int) -> list[str]:
    rate, new = row.get(f"{prefix}decode_tok_s"), row.get(f"{prefix}decode_new_tokens")
    if rate is None and new is None:
        return []
    bad = []
    bound = row["batch"] * MAX_STEPS_PER_S
    if not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0 < rate <= bound:
        bad.append(f"{prefix}decode_tok_s = {rate} (must be finite, > 0 and <= batch x {MAX_STEPS_PER_S:.0e} = {bound:.0e})")
    if not new or any(n != asked for n in new):
        bad.append(f"{prefix}decode_new_tokens = {new} (each call must generate the {asked} tokens asked)")
    return bad


def check_row(row: dict[str, Any], decode_tokens: int) -> list[str]:
    """The rules ``row`` breaks (empty: sane). ``decode_tokens``: the tokens each generate asked for."""
    bad = [m for p in _PREFIXES for k in _POSITIVE if (m := _positive(row, p + k))]
    prune = row.get("prune_ms")
    if not isinstance(prune, (int, float)) or not math.isfinite(prune) or prune < 0:
        bad.append(f"prune_ms = {prune} (must be finite and >= 0)")
    if not 0 < row.get("kept", 0) <= row.get("tokens_in", 0):
        bad.append(f"kept = {row.get('kept')} of tokens_in = {row.get('tokens_in')} (must be 1..tokens_in)")
    bad += [f"{k} = {row.get(k)} (must be finite)" for k in _RATIOS
            if k in row and not (isinstance(row[k], (int, float)) and math.isfinite(row[k]))]
    for p in ("", "unpruned_"):
        bad += _decode(row, p, decode_tokens)
    return bad


def check_vision_row(row: dict[str, Any]) -> list[str]:
    """The rules a vision-table row breaks (times > 0 and finite, agreement a share)."""
    bad = [m for k in ("sdpa_ms", "ours_ms", "official_ms") if (m := _positive(row, k))]
    a = row.get("agreement")
    if not isinstance(a, (int, float)) or not 0 <= a <= 1:
        bad.append(f"agreement = {a} (must be in [0, 1])")
    return bad


def noisy(row: dict[str, Any]) -> list[str]:
    """Why ``row``'s timings are noisy: other processes used >= ``NOISY_OTHERS`` of the CPUs while a part
    of it was measured, or a TTFT's repeats spread by more than ``NOISY_SPREAD`` x (max / min)."""
    out = []
    for p in _PREFIXES:
        share = row.get(f"{p}others_cpu")
        if share is not None and share >= NOISY_OTHERS:
            out.append(f"other processes used {100 * share:.0f}% of the CPUs while the {p.rstrip('_') or 'pruned'} "
                       "model was measured")
        lo_hi = row.get(f"{p}ttft_ms_range")
        if lo_hi and lo_hi[0] > 0 and lo_hi[1] / lo_hi[0] > NOISY_SPREAD:
            out.append(f"{p}ttft_ms repeats {lo_hi[0]:.1f}-{lo_hi[1]:.1f} ms")
    out += paired_flags(row)
    return out


def paired_flags(row: dict[str, Any]) -> list[str]:
    """Why the interleaved rounds (``row["paired"]``) cannot be trusted: the ideal — the same LLM fed
    fewer tokens, no scoring — was not faster than the unpruned model (the timings cannot tell the
    two apart, so no ratio of this row means anything), or other processes shared the GPU."""
    p = row.get("paired")
    if not p:
        return []
    out = []
    if p["ideal_ms"] >= p["unpruned_ms"]:
        out.append(f"ideal not faster than unpruned in the paired rounds ({p['ideal_ms']:.1f} vs {p['unpruned_ms']:.1f} ms)")
    if p.get("gpu_other_processes"):
        out.append(f"{p['gpu_other_processes']} other process(es) on the GPU")
    return out
