"""lmms-eval integration (issue 6): the real ``lmms-eval`` CLI, offline, on the embedded tiny model
and the local task; ``strategy=none`` gives the same predictions as lmms-eval's own ``llava_hf``
chat wrapper; the results JSON holds the metric and our token counts (lmms-eval exits 0 even when
an evaluation failed, so files are checked, not the exit code). Skipped where lmms-eval is not
installed (``pip install tokenprune[eval]``); CI installs it and sets TOKENPRUNE_REQUIRE_LMMS=1."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenprune.eval.tasks import include_path
from tokenprune.runner import DEFAULT_MODEL

if os.environ.get("TOKENPRUNE_REQUIRE_LMMS") != "1":
    pytest.importorskip("lmms_eval")

TASK = "tokenprune_vqa"
N_DOCS = 100


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "lmms-eval"
    return [str(exe)] if exe.exists() else [shutil.which("lmms-eval") or "lmms-eval"]


def lmms_eval(tmp_path: Path, model: str, model_args: str, *extra: str) -> tuple[dict, list[dict]]:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([*_cli(), "--model", model, "--model_args", model_args, "--tasks", TASK,
                           "--include_path", str(include_path()), "--device", "cpu", "--output_path", str(out),
                           "--log_samples", *extra], env=env, capture_output=True, text=True, timeout=600)
    results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    samples = glob.glob(str(out / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    assert results and samples, f"no results written (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in Path(samples[0]).read_text().splitlines()]
    return json.loads(Path(results[0]).read_text()), sorted(rows, key=lambda r: r["doc_id"])


@pytest.fixture(scope="module")
def unpruned(tmp_path_factory):
    return lmms_eval(tmp_path_factory.mktemp("none"), "tokenprune",
                     f"pretrained={DEFAULT_MODEL},strategy=none,dtype=float32", "--batch_size", "1")


@pytest.mark.slow
def test_unpruned_metric_and_counts(unpruned):
    res, rows = unpruned
    assert res["results"][TASK]["exact_match,none"] >= 0.85 and len(rows) == N_DOCS
    assert "TokenPruneChat (chat)" in res["config"]["model_backend"]
    assert res["throughput"]["avg_visual_tokens_in"] == res["throughput"]["avg_visual_tokens_kept"] == 256 * N_DOCS
    assert all(r["token_counts"][0]["visual_tokens_kept"] == 256 and r["token_counts"][0]["ttft_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_none_equals_lmms_evals_own_llava_hf_wrapper(unpruned, tmp_path):
    res, rows = lmms_eval(tmp_path, "llava_hf", f"pretrained={DEFAULT_MODEL},dtype=float32,device_map=cpu",
                          "--batch_size", "1")
    assert [r["filtered_resps"] for r in rows] == [r["filtered_resps"] for r in unpruned[1]]
    assert res["results"][TASK]["exact_match,none"] == unpruned[0]["results"][TASK]["exact_match,none"]


@pytest.mark.parametrize("args,extra,kept", [
    ("strategy=hiprune,keep=0.111,alpha=0.1", ("--batch_size", "4"), 28),
    ("strategy=visionzip,budget=40,dominant=30", ("--batch_size", "2", "--force_simple"), 40),
])
@pytest.mark.slow
def test_pruned_runs_record_tokens_per_sample(unpruned, tmp_path, args, extra, kept):
    res, rows = lmms_eval(tmp_path, "tokenprune", f"pretrained={DEFAULT_MODEL},dtype=float32,{args}", *extra)
    score = res["results"][TASK]["exact_match,none"]
    assert 0.3 <= score <= unpruned[0]["results"][TASK]["exact_match,none"] + 0.05
    assert res["throughput"]["avg_visual_tokens_kept"] == kept * N_DOCS
    for r, u in zip(rows, unpruned[1]):
        c = r["token_counts"][0]
        assert (c["visual_tokens_in"], c["visual_tokens_kept"]) == (256, kept)
        assert c["input_tokens"] == u["token_counts"][0]["input_tokens"] - (256 - kept)
    style = "simple" if "--force_simple" in extra else "chat"
    assert f"({style})" in res["config"]["model_backend"]


def test_sweep_writes_table_and_plot(tmp_path):
    from tokenprune.cli import main

    main(["sweep", "--strategies", "random", "hiprune", "--keeps", "0.111", "--limit", "12", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["strategy"], r["keep"]) for r in res["rows"]] == [("none", 1.0), ("random", 0.111), ("hiprune", 0.111)]
    assert [round(r["visual_tokens_kept"]) for r in res["rows"]] == [256, 28, 28]
    assert all(0 <= r["score"] <= 1 for r in res["rows"])
    md = (tmp_path / "sweep.md").read_text()
    assert "| hiprune | 0.111 | tokenprune_vqa | exact_match |" in md
    assert (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_two_processes_with_torchrun_equal_one(tmp_path):
    """Data-parallel launch (torchrun, gloo on CPU): documents are sharded and gathered; the result
    equals the single-process run."""
    args = f"pretrained={DEFAULT_MODEL},strategy=random,budget=28,dtype=float32"
    single, rows1 = lmms_eval(tmp_path / "one", "tokenprune", args, "--batch_size", "2")
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "WANDB_MODE": "disabled"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           "29577", "-m", "lmms_eval", "--model", "tokenprune", "--model_args", args, "--tasks", TASK,
                           "--include_path", str(include_path()), "--device", "cpu", "--batch_size", "2",
                           "--output_path", str(out), "--log_samples"], env=env, capture_output=True, text=True,
                          timeout=600)
    results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert results, proc.stderr[-3000:]
    two = json.loads(Path(results[0]).read_text())
    samples = Path(glob.glob(str(out / "**" / "*.jsonl"), recursive=True)[0])
    rows2 = [json.loads(line) for line in samples.read_text().splitlines()]
    assert two["results"][TASK]["exact_match,none"] == single["results"][TASK]["exact_match,none"]
    assert sorted(r["doc_id"] for r in rows2) == list(range(N_DOCS))
    assert {r["doc_id"]: r["filtered_resps"] for r in rows2} == {r["doc_id"]: r["filtered_resps"] for r in rows1}
