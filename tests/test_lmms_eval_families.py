"""lmms-eval on the families of issue 24 (Qwen3.5, InternVL, Gemma 3): the real CLI, offline, on a
tiny model of each saved with its real processor, the project's local task (first documents). Per
sample the kept counts are exact, the prompt shrinks by exactly the pruned tokens, and a batch of 2
(left padding) answers as one by one."""
from __future__ import annotations

import importlib

import pytest
from test_lmms_eval import lmms_eval

LIMIT = "6"
BUDGET = 8
#: family -> (tiny builder module, a strategy the family serves besides the vision-stage hiprune)
FAMILIES = {
    "qwen3_5": ("eval.tiny_qwen3_5", "strategy=fastv,budget=8,layer=3"),   # layer 3: full attention
    "internvl": ("eval.tiny_internvl", "strategy=visionzip,budget=8"),
    "gemma3": ("eval.tiny_gemma3", "strategy=visionzip,budget=8"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model"
    importlib.import_module(FAMILIES[request.param][0]).save(path)
    unpruned = lmms_eval(path.parent / "none", "tokenprune", f"pretrained={path},strategy=none,dtype=float32",
                         "--batch_size", "2", "--limit", LIMIT)
    return request.param, path, unpruned


def _check_counts(rows: list[dict], unpruned_rows: list[dict], kept: int) -> None:
    assert len(rows) == len(unpruned_rows) == int(LIMIT)
    for r, u in zip(rows, unpruned_rows):
        c, cu = r["token_counts"][0], u["token_counts"][0]
        assert cu["visual_tokens_in"] == cu["visual_tokens_kept"] > kept
        assert (c["visual_tokens_in"], c["visual_tokens_kept"]) == (cu["visual_tokens_in"], kept)
        assert c["input_tokens"] == cu["input_tokens"] - (cu["visual_tokens_in"] - kept)


@pytest.mark.slow
def test_hiprune_counts_and_batch_equals_one_by_one(saved, tmp_path):
    _, path, (_, unpruned_rows) = saved
    args = f"pretrained={path},strategy=hiprune,budget={BUDGET},dtype=float32"
    res1, rows1 = lmms_eval(tmp_path / "b1", "tokenprune", args, "--batch_size", "1", "--limit", LIMIT)
    res2, rows2 = lmms_eval(tmp_path / "b2", "tokenprune", args, "--batch_size", "2", "--limit", LIMIT)
    _check_counts(rows1, unpruned_rows, BUDGET)
    _check_counts(rows2, unpruned_rows, BUDGET)
    assert [r["filtered_resps"] for r in rows2] == [r["filtered_resps"] for r in rows1]
    assert res2["throughput"]["avg_visual_tokens_kept"] == BUDGET * int(LIMIT)
    assert 0.0 <= res2["results"]["tokenprune_vqa"]["exact_match,none"] <= 1.0


@pytest.mark.slow
def test_second_strategy_runs(saved, tmp_path):
    name, path, (_, unpruned_rows) = saved
    res, rows = lmms_eval(tmp_path, "tokenprune", f"pretrained={path},dtype=float32,{FAMILIES[name][1]}",
                          "--batch_size", "2", "--limit", LIMIT)
    _check_counts(rows, unpruned_rows, BUDGET)
    assert "TokenPruneChat (chat)" in res["config"]["model_backend"]
    assert res["throughput"]["avg_visual_tokens_kept"] == BUDGET * int(LIMIT)
