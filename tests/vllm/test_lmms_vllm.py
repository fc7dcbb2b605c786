"""lmms-eval's own vLLM backend (``--model vllm``) with the plugin switched on through its model_args
(``hf_overrides={"tokenprune": {...}}``, which lmms-eval parses as JSON and passes to ``LLM``), on the
shipped tiny LLaVA and the project's local task: the same predictions and score as lmms-eval on
tokenprune's transformers backend (``--model tokenprune``, positions="compact"), and pruning visibly
on (its predictions are not the unpruned vLLM run's on every document)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engines import LLAVA

pytest.importorskip("lmms_eval")

TASK, LIMIT = "tokenprune_vqa", "40"
PRUNE = {"strategy": "hiprune", "budget": 16}


def _run(tmp: Path, model: str, args: str) -> tuple[float, dict[int, list]]:
    from tokenprune.eval.tasks import include_path

    out = tmp / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf"), "WANDB_MODE": "disabled",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    exe = Path(sys.executable).parent / "lmms-eval"
    proc = subprocess.run([str(exe), "--model", model, "--model_args", args, "--tasks", TASK, "--include_path",
                           str(include_path()), "--output_path", str(out), "--log_samples", "--limit", LIMIT,
                           "--batch_size", "4"], env=env, capture_output=True, text=True, timeout=900)
    results = list(out.glob("**/*_results.json"))
    samples = list(out.glob(f"**/*_samples_{TASK}.jsonl"))
    assert results and samples, f"no results (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    score = json.loads(results[0].read_text())["results"][TASK]["exact_match,none"]
    return score, {r["doc_id"]: r["filtered_resps"] for r in rows}


def test_vllm_backend_with_the_plugin_equals_the_transformers_backend(tmp_path):
    vllm_args = f"model={LLAVA},dtype=float32,max_model_len=512,enforce_eager=True"
    pruned = _run(tmp_path / "vllm", "vllm", f"{vllm_args},hf_overrides={json.dumps({'tokenprune': PRUNE})}")
    hf = _run(tmp_path / "hf", "tokenprune", f"pretrained={LLAVA},dtype=float32,strategy={PRUNE['strategy']},"
                                             f"budget={PRUNE['budget']},positions=compact")
    unpruned = _run(tmp_path / "none", "vllm", vllm_args)
    assert len(pruned[1]) == int(LIMIT)
    assert pruned[1] == hf[1] and pruned[0] == hf[0]
    assert pruned[1] != unpruned[1]                 # the plugin was on: 16 of 256 tokens change answers
    assert unpruned[0] >= 0.85                      # the shipped model, unpruned, on this task
