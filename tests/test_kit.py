"""The public conformance kit (``tokenprune.testing``) over every built-in family and strategy,
plus a stacked pair: the invariants every family and strategy share. Family-specific references
(eager vision scores mapped through each layout) stay in the family test files."""
from __future__ import annotations

import tokenprune
from tokenprune.testing import ConformanceSuite, builtin_cases

# HoliTom's outer stage is video-only and checked against its reference in test_holitom_video.py
STRATEGIES = [s for s in tokenprune.list_strategies() if s != "holitom"]


class TestBuiltins(ConformanceSuite):
    cases = builtin_cases()
    strategies = [*STRATEGIES, ("visionzip", {}, ("fastv", {"keep": 0.5}))]


class TestLlavaParameterVariants(ConformanceSuite):
    """Parameters that change which code path runs (FoPru's modes, FastV / HoliTom-M at K=1)."""
    cases = builtin_cases()[:1]
    strategies = [("fopru", {"mode": "rank"}), ("fopru", {"mode": "row"}), ("fastv", {"layer": 1}),
                  ("holitom_inner", {"layer": 1, "weighting": "mean"})]
