"""eval.bench.vllm_serve at its tiny preset: two real servers (unpruned, hiprune), every request
decodes exactly max_tokens (ignore_eos), rows per concurrency, the table written."""
from __future__ import annotations


def test_tiny_serving_bench_runs_both_configs(tmp_path):
    from eval.bench.vllm_serve import PRESETS, main

    p = PRESETS["tiny"]
    res = main(["--preset", "tiny", "--out", str(tmp_path)])
    assert [(r["config"], r["concurrency"]) for r in res["rows"]] == [
        (name, c) for name in ("unpruned", f"hiprune {p['budget']}") for c in p["concurrency"]]
    for r in res["rows"]:
        assert r["output_tokens"] == r["requests"] * p["max_tokens"]
        assert r["requests_per_s"] > 0 and r["ttft_median_ms"] <= r["ttft_p90_ms"]
        assert len(r["prompt_tokens"]) == 1        # one prompt text: one length per config
    assert res["visual_tokens"] == 256
    assert "| hiprune 16 | 2 |" in (tmp_path / "vllm_serve.md").read_text()
    assert not list(tmp_path.glob("**/*.safetensors"))          # no checkpoint in the results folder
    base = res["rows"][0]["prompt_tokens"][0]
    assert all(r["prompt_tokens"] == [base - (256 - p["budget"])] for r in res["rows"] if r["config"] != "unpruned")
