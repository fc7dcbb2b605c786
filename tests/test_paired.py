"""Paired comparisons of benchmark rows (eval/synthetic/paired.py): exact McNemar p-values and the
paired interval against hand-computed values, and the saved per-question results round-trip."""
from __future__ import annotations

import math

import pytest
import torch

from tokenprune.eval.synthetic import paired


def test_encode_decode_round_trip():
    ok = torch.tensor([True, False, False, True, True])
    assert paired.encode(ok) == "10011"
    assert torch.equal(paired.decode("10011"), ok)


def test_mcnemar_exact_by_hand():
    # 10 vs 2 discordant: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert paired.mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096)
    assert paired.mcnemar_p(2, 10) == paired.mcnemar_p(10, 2)
    assert paired.mcnemar_p(0, 0) == 1.0 and paired.mcnemar_p(3, 3) == 1.0     # capped at 1
    assert paired.mcnemar_p(6, 0) == pytest.approx(2 / 64)


def test_paired_difference_and_interval():
    # 100 questions: a right on 60, b right on 50; they disagree on 14 (12 a-only, 2 b-only)
    a = torch.zeros(100, dtype=torch.bool)
    b = torch.zeros(100, dtype=torch.bool)
    a[:48] = b[:48] = True            # both right
    a[48:60] = True                   # a only
    b[60:62] = True                   # b only
    c = paired.compare(a, b)
    assert c["diff"] == pytest.approx(0.10) and (c["a_only"], c["b_only"]) == (12, 2)
    d = a.double() - b.double()
    se = math.sqrt(((d - 0.1) ** 2).sum().item() / 99) / 10
    assert c["lo"] == pytest.approx(0.1 - 1.96 * se) and c["hi"] == pytest.approx(0.1 + 1.96 * se)
    assert c["p"] == pytest.approx(paired.mcnemar_p(12, 2))
    # identical rows: no difference, an empty interval, p = 1
    same = paired.compare(a, a)
    assert same["diff"] == same["lo"] == same["hi"] == 0 and same["p"] == 1.0


def test_paired_needs_the_same_questions():
    with pytest.raises(ValueError, match="same questions"):
        paired.compare(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


def test_comparisons_from_a_saved_run():
    res = {"n": 4, "unpruned_right": "1111", "rows": [
        {"strategy": "x", "keep": 0.111, "right": "1100"}, {"strategy": "y", "keep": 0.111, "right": "1000"}]}
    comps = paired.comparisons(res, (("x", "y"), ("x", "unpruned"), ("x", "missing")), (0.111, 0.333))
    assert [(c["a"], c["b"], c["keep"]) for c in comps] == [("x", "y", 0.111), ("x", "unpruned", 0.111)]
    assert comps[0]["diff"] == pytest.approx(0.25) and comps[1]["diff"] == pytest.approx(-0.5)
    md = paired.to_markdown(comps, 4)
    assert "| 0.111 | x vs y | +25.0 |" in md and "1 / 0" in md
