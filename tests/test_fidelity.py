"""Fidelity regression (issue 7): the trained tiny VQA model loaded offline from assets/, its
unpruned accuracy on a fixed test subset, and floors pinned at the values measured for every
strategy at keep 0.333 and 0.111 (200 questions of the test split), so that a change that silently
breaks a strategy's selection fails. Tolerance: 3 questions (float differences across transformers
versions can flip a borderline answer), 1 point of object recall."""
from __future__ import annotations

import pytest

from tokenprune.eval.synthetic.fidelity import DEFAULT_MODEL, load, run

N = 200
TOL = 3 / N
#: accuracies are float32 means: 89 of 100 is 0.88999999, below 0.92 - 0.03 in float64 by rounding alone
EPS = 1e-6
#: measured 2026-11-27 (CPU, torch 2.14.1, transformers 5.24.0) on the shipped model of that day
#: (continued 45 min on the CPU with object-centred dropout masks): accuracy, object recall
FLOORS = {
    ("hiprune", 0.333): (0.900, 0.995), ("hiprune", 0.111): (0.890, 0.956),
    ("visionzip", 0.333): (0.870, 0.838), ("visionzip", 0.111): (0.850, 0.781),
    ("fopru", 0.333): (0.900, 0.992), ("fopru", 0.111): (0.870, 0.961),
    ("fastv", 0.333): (0.885, 0.748), ("fastv", 0.111): (0.865, 0.679),
    ("fastv (layer=1)", 0.333): (0.885, 0.853), ("fastv (layer=1)", 0.111): (0.860, 0.674),
    ("random", 0.333): (0.870, 0.329), ("random", 0.111): (0.790, 0.104),
    ("pool", 0.333): (0.830, 0.340), ("pool", 0.111): (0.765, 0.120),
    ("holitom_inner", 0.333): (0.900, 0.736), ("holitom_inner", 0.111): (0.885, 0.653),
    # measured 2026-12-02 (same machine and versions, the same shipped model) when these were added
    ("divprune", 0.333): (0.900, 0.815), ("divprune", 0.111): (0.900, 0.630),
    ("vispruner", 0.333): (0.890, 0.966), ("vispruner", 0.111): (0.850, 0.895),
    ("prumerge", 0.333): (0.905, 0.476), ("prumerge", 0.111): (0.840, 0.321),
}
UNPRUNED = 0.900


@pytest.fixture(scope="module")
def result():
    return run(DEFAULT_MODEL, n=N, keeps=(0.333, 0.111))


def test_loads_offline_from_assets():
    model, processor = load()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


@pytest.mark.slow
def test_unpruned_accuracy(result):
    assert result["unpruned"] >= UNPRUNED - TOL - EPS
    assert result["unpruned_by_type"]["color"] >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(FLOORS))
def test_regression_floor(result, key):
    row = next(r for r in result["rows"] if (r["strategy"], r["keep"]) == key)
    acc, recall = FLOORS[key]
    assert row["accuracy"] >= acc - TOL - EPS, row
    assert row["object_recall"] >= recall - 0.01, row
    assert row["kept"] == {0.333: 85, 0.111: 28}[key[1]]


@pytest.mark.slow
def test_benchmark_discriminates(result):
    """Random at 0.111 is clearly below unpruned, and attention-based selection finds the objects."""
    rows = {(r["strategy"], r["keep"]): r for r in result["rows"]}
    assert rows[("random", 0.111)]["accuracy"] <= result["unpruned"] - 0.05
    assert rows[("hiprune", 0.111)]["object_recall"] >= 8 * rows[("random", 0.111)]["object_recall"]


def test_control_masks_keep_exact_budgets():
    import torch

    from tokenprune.eval.synthetic.fidelity import control_keep

    obj = torch.zeros(3, 256, dtype=torch.bool)
    obj[0, :10] = obj[1, 100:140] = True                     # 10 and 40 object patches, none in row 2
    for n in (1, 28, 85):
        first, back = control_keep(obj, n, "objects first"), control_keep(obj, n, "background only")
        assert first.sum(1).tolist() == [n] * 3 and back.sum(1).tolist() == [n] * 3
        assert not (back & obj).any()
        assert ((first & obj).sum(1) == torch.minimum(obj.sum(1), torch.tensor(n))).all()


def test_control_forward_equals_pruned_forward():
    """The controls' masked forward is what a pruned forward computes: fed the kept indices of the
    random strategy, it gives the pruned model's logits; fed everything, the unpruned ones."""
    import torch
    from conftest import masked_logits, pruned_and_masked_logits

    from tokenprune.eval.synthetic.fidelity import prepare
    from tokenprune.eval.synthetic.splits import split

    model, processor = load()
    data = prepare(processor, split(6))
    pruned, masked, _ = pruned_and_masked_logits(model, data, 256)
    torch.testing.assert_close(masked, pruned, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        full = model(**data["inputs"], logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(masked_logits(model, data, torch.ones(6, 256, dtype=torch.bool)), full,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_rows_carry_per_question_results_for_paired_comparisons(result):
    """Every row saves which questions it got right (consistent with its accuracy), and the markdown
    compares the goal rows pairwise on the same questions."""
    from tokenprune.eval.synthetic.fidelity import to_markdown
    from tokenprune.eval.synthetic.paired import decode

    assert decode(result["unpruned_right"]).float().mean().item() == pytest.approx(result["unpruned"])
    for r in result["rows"]:
        assert len(r["right"]) == N and decode(r["right"]).float().mean().item() == pytest.approx(r["accuracy"])
    md = to_markdown(result)
    assert "Paired comparisons on the same 200 questions" in md
    assert "| 0.111 | hiprune vs visionzip |" in md and "| 0.333 | hiprune vs unpruned |" in md


@pytest.mark.slow
def test_controls_in_the_benchmark(result):
    rows = {(r["strategy"], r["keep"]): r for r in result["rows"]}
    for keep, kept in ((0.333, 85), (0.111, 28)):
        assert rows[("background only", keep)]["object_recall"] == 0 and rows[("background only", keep)]["kept"] == kept
        assert rows[("objects first", keep)]["object_recall"] >= 0.9 and rows[("objects first", keep)]["control"]


def test_rows_with_parameters():
    from tokenprune.eval.synthetic.fidelity import parse_row

    assert parse_row("hiprune") == ("hiprune", "hiprune", {})
    assert parse_row("fastv:layer=1") == ("fastv (layer=1)", "fastv", {"layer": 1})
    assert parse_row("hiprune:alpha=0.2,layer=3") == ("hiprune (alpha=0.2,layer=3)", "hiprune",
                                                      {"alpha": 0.2, "layer": 3})


def test_fidelity_cli_writes_table_plot_and_controls(tmp_path):
    """`tokenprune fidelity` (image and --video) with a parameterised row and one control writes
    markdown, JSON and a plot whose rows are the ones asked for."""
    import json

    from tokenprune.cli import main

    for extra, stem, rows in ((["--strategies", "fastv:layer=1", "--controls", "background only"], "fidelity",
                               {"fastv (layer=1)", "background only"}),
                              (["--video", "--strategies", "random", "--controls", "static only"], "fidelity_video",
                               {"random", "static only"})):
        assert main(["fidelity", "--n", "4", "--out", str(tmp_path), *extra]) == 0
        res = json.loads((tmp_path / f"{stem}.json").read_text())
        assert {r["strategy"] for r in res["rows"]} == rows and len(res["rows"]) == 12
        assert "controls, not strategies" in (tmp_path / f"{stem}.md").read_text()
        assert (tmp_path / f"{stem}.png").stat().st_size > 0


@pytest.mark.parametrize("strategy", ["hiprune", "visionzip"])
def test_pruned_generation_stops_after_the_answer(strategy):
    """Greedy generation under tight object-centred pruning says the answer word and stops: the
    whole-answer exact match equals the first-token accuracy (the model trained with random-only
    dropout answered "blue four no no ..." at 0.111: HiPrune 69% exact vs 82% first token)."""
    import torch

    import tokenprune
    from tokenprune.eval.synthetic.fidelity import prepare
    from tokenprune.eval.synthetic.splits import split

    model, processor = load()
    data = prepare(processor, split(100))
    eos = processor.tokenizer.eos_token_id
    h = tokenprune.apply(model, strategy, keep=0.111)
    try:
        with torch.no_grad():
            out = model.generate(**data["inputs"], max_new_tokens=3, do_sample=False, pad_token_id=eos,
                                 eos_token_id=eos)
    finally:
        h.remove()
    gen = out[:, data["inputs"]["input_ids"].shape[1]:]
    first = gen[:, 0] == data["answers"]
    stops = gen[:, 1] == eos
    assert first.float().mean() >= 0.8
    assert (first & stops).sum() >= first.sum() - 2, (first.sum(), (first & stops).sum())


def test_merging_adds_rows_on_the_same_questions_only():
    """--merge: new rows replace the same (strategy, keep) or join before the controls; results of
    other questions are refused (paired comparisons need the same questions)."""
    from tokenprune.eval.synthetic.fidelity import merge_results

    base = {"n": 2, "tokens": 4, "unpruned_right": "a", "rows": [
        {"strategy": "hiprune", "keep": 0.5}, {"strategy": "objects first", "keep": 0.5, "control": True}]}
    new = {"n": 2, "tokens": 4, "unpruned_right": "a", "rows": [
        {"strategy": "hiprune", "keep": 0.5, "accuracy": 1.0}, {"strategy": "divprune", "keep": 0.5}]}
    rows = merge_results(base, new)["rows"]
    assert [r["strategy"] for r in rows] == ["hiprune", "divprune", "objects first"] and rows[0]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="same questions"):
        merge_results(base, {**new, "unpruned_right": "b"})
