"""The speed/memory benchmark's harness (eval/bench): sanity rules, timers, memory probe, CLI behaviour.

Only bounds that hold on any machine are asserted (finite, > 0, exact token counts), never timings.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from tokenprune.eval.bench import run as bench_run
from tokenprune.eval.bench.report import to_markdown
from tokenprune.eval.bench.sanity import MAX_STEPS_PER_S, check_row, check_vision_row, noisy
from tokenprune.eval.bench.timing import OtherWork, cpu_peak_method, decode_samples, peak_mb, time_samples

REPO = Path(__file__).resolve().parents[1]


def sane_row(**change: object) -> dict:
    """A plausible bench row (qwen2.5-vl-tiny, hiprune), with ``change`` applied."""
    row = {"model": "qwen2.5-vl-tiny", "batch": 1, "strategy": "hiprune", "tokens_in": 24, "kept": 8,
           "prune_ms": 1.2, "flops_ratio": 0.54, "pruned_over_unpruned": 1.1, "pruned_over_ideal": 1.05,
           "overhead_share": 0.04, "decode_tok_s": 250.0, "decode_new_tokens": [4, 4, 4],
           "unpruned_decode_tok_s": 240.0, "unpruned_decode_new_tokens": [4, 4, 4]}
    for p, ttft in (("", 6.0), ("unpruned_", 5.4), ("ideal_", 5.7)):
        row.update({f"{p}ttft_ms": ttft, f"{p}ttft_ms_range": [ttft * 0.9, ttft * 1.2], f"{p}llm_ms": 2.0,
                    f"{p}peak_mb": 790.0, f"{p}kv_mb": 0.02})
    row.update(vision_ms=3.0, unpruned_vision_ms=2.5)
    row.update(change)
    return row


def test_a_sane_row_passes():
    assert check_row(sane_row(), decode_tokens=4) == []
    assert noisy(sane_row()) == []


@pytest.mark.parametrize("change, rule", [
    ({"decode_tok_s": 2e9}, "decode_tok_s"),                      # the row: 2 steps / 1e-9 s
    ({"decode_tok_s": float("inf")}, "decode_tok_s"),
    ({"decode_tok_s": float("nan")}, "decode_tok_s"),
    ({"unpruned_decode_tok_s": -3.0}, "unpruned_decode_tok_s"),
    ({"decode_new_tokens": [4, 1, 4]}, "decode_new_tokens"),      # generation stopped early
    ({"decode_new_tokens": []}, "decode_new_tokens"),
    ({"ttft_ms": 0.0}, "ttft_ms"),
    ({"ideal_ttft_ms": float("nan")}, "ideal_ttft_ms"),
    ({"unpruned_llm_ms": -1.0}, "unpruned_llm_ms"),
    ({"peak_mb": 0.0}, "peak_mb"),                                # the CPU rows
    ({"unpruned_peak_mb": 0}, "unpruned_peak_mb"),
    ({"kv_mb": 0.0}, "kv_mb"),
    ({"prune_ms": float("nan")}, "prune_ms"),
    ({"kept": 30}, "kept"),
    ({"pruned_over_ideal": float("inf")}, "pruned_over_ideal"),
])
def test_nonsense_is_flagged(change, rule):
    broken = check_row(sane_row(**change), decode_tokens=4)
    assert len(broken) == 1 and broken[0].startswith(rule + " ="), broken


def test_the_decode_bound_scales_with_the_batch():
    assert check_row(sane_row(batch=16, decode_tok_s=16 * MAX_STEPS_PER_S), decode_tokens=4) == []
    assert check_row(sane_row(batch=1, decode_tok_s=16 * MAX_STEPS_PER_S), decode_tokens=4)


def test_vision_rows_are_checked():
    v = {"sdpa_ms": 2.0, "ours_ms": 2.4, "official_ms": 5.0, "agreement": 1.0}
    assert check_vision_row(v) == []
    assert check_vision_row({**v, "ours_ms": 0.0}) and check_vision_row({**v, "agreement": 1.5})


def test_noise_is_a_separate_softer_signal():
    row = sane_row(unpruned_ttft_ms_range=[5.0, 112.0], ideal_others_cpu=0.6)
    assert check_row(row, decode_tokens=4) == []
    assert sorted(noisy(row)) == ["other processes used 60% of the CPUs while the ideal model was measured",
                                  "unpruned_ttft_ms repeats 5.0-112.0 ms"]


def test_markdown_marks_flagged_rows_and_lists_why():
    res = {"machine": "m", "torch": "t", "transformers": "x", "repeats": 3, "warmup": 1, "decode_tokens": 4,
           "memory": "peak RSS", "rows": [sane_row(sanity=["decode_tok_s = 2e9 (...)"], noisy=[]),
                                          sane_row(strategy="pool", sanity=[], noisy=["spread"])]}
    md = to_markdown(res)
    assert "| ⚠ qwen2.5-vl-tiny | 1 | hiprune |" in md and "| ≈ qwen2.5-vl-tiny | 1 | pool |" in md
    assert "- qwen2.5-vl-tiny bs=1 hiprune kept=8: decode_tok_s = 2e9 (...)" in md
    assert "6.0 (5.4–7.2)" in md and "Peak MB: peak RSS" in md


def test_markdown_still_renders_results_written_before_the_checks():
    for name in ("bench_cpu.json", "bench_gpu.json"):
        res = json.loads((REPO / "eval" / "results" / name).read_text())
        lines = to_markdown(res).splitlines()
        assert len([line for line in lines if line.startswith("| ")]) >= len(res["rows"])
        assert not [line for line in lines if line.startswith(("| ⚠", "| ≈"))]   # no checks ran then


def test_the_gc_is_off_while_timing_only():
    seen = []
    samples = time_samples(lambda: seen.append(gc.isenabled()), "cpu", repeats=3, warmup=2)
    assert seen == [True, True, False, False, False] and gc.isenabled()
    assert len(samples) == 3 and all(math.isfinite(t) and t >= 0 for t in samples)


def fake_generate(prompt_len: int, steps: int, batch: int = 1):
    """A stand-in for ``model.generate(..., streamer=clock)``: stamps the prompt, then ``steps`` tokens."""
    def gen(clock):
        clock.put(torch.zeros(batch, prompt_len))
        for _ in range(steps):
            time.sleep(0.002)
            clock.put(torch.zeros(batch))
        clock.end()
        return torch.zeros(batch, prompt_len + steps, dtype=torch.long)
    return gen


def test_decode_rate_is_timed_inside_each_call():
    rates, new = decode_samples(fake_generate(10, 4, batch=2), prompt_len=10, batch=2, repeats=3, warmup=1)
    assert new == [4, 4, 4]
    # 3 intervals of >= 2 ms each: a rate of at most 2 x 3 / 0.006 s, whatever the machine
    assert all(math.isfinite(r) and 0 < r <= 2 * 3 / 0.006 for r in rates)


def test_a_generation_that_stops_early_is_flagged_not_divided_by_zero():
    rates, new = decode_samples(fake_generate(10, 1), prompt_len=10, batch=1, repeats=2, warmup=0)
    assert new == [1, 1] and all(math.isnan(r) for r in rates)
    broken = check_row(sane_row(decode_tok_s=float("nan"), decode_new_tokens=new), decode_tokens=4)
    assert [b.split(" =")[0] for b in broken] == ["decode_tok_s", "decode_new_tokens"]


def test_other_work_is_a_share_of_the_cpus():
    with OtherWork() as w:
        time.sleep(0.05)
    assert w.share is None or 0.0 <= w.share <= 1.0


def test_cpu_peak_memory_is_the_process_peak_during_the_call():
    assert peak_mb(lambda: None, "cpu") > 0      # the process's own RSS: never 0
    if cpu_peak_method() == "vmhwm":             # exact high-water mark: a 64 MiB buffer touched in the call counts
        assert peak_mb(lambda: torch.ones(16 * 2**20).sum(), "cpu") >= 64


# -- the command -----------------------------------------------------------------------------------
def test_every_option_has_help_and_the_description_is_whole():
    ap = bench_run.parser()
    assert ap.description.endswith(".") and "\n" not in ap.description
    options = [a for a in ap._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"preset", "device", "strategies", "repeats", "models", "out"}
    assert all(a.help for a in options), [a.dest for a in options if not a.help]


@pytest.mark.parametrize("missing", ["matplotlib", "tqdm"])
def test_a_missing_optional_package_stops_before_any_work(missing, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, missing, None)      # import fails, find_spec answers None
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(bench_run, "build", lambda *a: ran.append("build"))
    monkeypatch.setattr(bench_run.Bench, "run", lambda self: ran.append("run"))
    with pytest.raises(SystemExit) as e:
        bench_run.main(["--preset", "tiny"])
    assert e.value.code == 2 and ran == [] and not any(tmp_path.iterdir())
    assert capsys.readouterr().err == f'error: tokenprune bench needs {missing}; pip install "tokenprune[eval]"\n'


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real run at the smallest size: qwen2.5-vl-tiny, hiprune, 1 timed repeat, default --out, in a
    fresh working folder (the issue's nonsense row)."""
    cwd = tmp_path_factory.mktemp("cwd")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(cwd)
        res = bench_run.main(["--preset", "tiny", "--device", "cpu", "--models", "qwen2.5",
                              "--strategies", "hiprune", "--repeats", "1"])
    return cwd, res, printed.getvalue()


def test_the_default_out_folder_is_under_the_working_directory(tiny_run):
    cwd, _, printed = tiny_run
    out = cwd / "tokenprune_out" / "bench"
    assert f"to {out.resolve()}" in printed.splitlines()[-1]
    for name in ("bench_tiny.json", "bench_tiny.md", "bench_tiny_ttft.png", "bench_tiny_overhead.png"):
        assert (out / name).stat().st_size > 0
    assert sorted(p.name for p in cwd.iterdir()) == ["tokenprune_out"]


def test_the_tiny_qwen_hiprune_row_is_sane(tiny_run):
    _, res, _ = tiny_run
    assert not res["errors"] and res["sanity_failures"] == 0
    (row,) = res["rows"]
    p = row["paired"]                                   # interleaved rounds: one per repeat
    assert p["rounds"] == 1 and all(p[f"{k}_ms"] > 0 for k in ("unpruned", "pruned", "ideal"))
    assert row["paired_pruned_over_ideal"] == p["pruned_ms"] / p["ideal_ms"]
    assert (row["model"], row["strategy"], row["kept"], row["tokens_in"]) == ("qwen2.5-vl-tiny", "hiprune", 8, 24)
    assert row["sanity"] == []
    asked = res["decode_tokens"]
    assert row["decode_new_tokens"] == row["unpruned_decode_new_tokens"] == [asked] * 3
    for p in ("", "unpruned_", "ideal_"):
        assert math.isfinite(row[f"{p}ttft_ms"]) and row[f"{p}ttft_ms"] > 0
        lo, hi = row[f"{p}ttft_ms_range"]
        assert 0 < lo <= row[f"{p}ttft_ms"] <= hi
    for p in ("", "unpruned_"):
        assert 0 < row[f"{p}decode_tok_s"] <= MAX_STEPS_PER_S


def test_the_rss_measure_is_positive_on_cpu(tiny_run):
    _, res, _ = tiny_run
    (row,) = res["rows"]
    assert "peak RSS" in res["memory"]
    assert row["peak_mb"] > 0 and row["unpruned_peak_mb"] > 0 and row["ideal_peak_mb"] > 0


def test_interleaved_rounds_rotate_and_warm_up_until_stable(monkeypatch):
    """Every column once per round, the order rotated; warm-up rounds (not kept) go on until each
    column is within 10 % of its previous round, at most max_warmup; enter / leave run around a call."""
    import eval.bench.timing as timing

    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    out = timing.interleaved(fns, "cpu", rounds=3, warmup=0)
    assert {n: len(v) for n, v in out.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abc" "bca" "cab")
    times = iter([5.0, 1.0, 1.05] + [2.0] * 100)            # round 0 -> 5, round 1 -> 1, round 2 -> 1.05 ...
    per_round: list[float] = []

    def fake(fn, device):
        fn()
        if len(calls) % 3 == 1:
            per_round.append(next(times))
        return per_round[-1]

    monkeypatch.setattr(timing, "_one_ms", fake)
    calls.clear()
    timing.interleaved(fns, "cpu", rounds=2, warmup=1)
    assert len(calls) == 3 * (3 + 2)            # rounds 0-2 warm up (2 is within 10 % of 1), then 2 kept
    calls.clear()
    timing.interleaved(fns, "cpu", rounds=1, warmup=1, max_warmup=4)
    assert len(calls) == 3 * (2 + 1)            # 2.0 then 2.0: stable after two rounds
    log: list[str] = []

    class Hooked:
        def enter(self): log.append("enter")
        def leave(self): log.append("leave")
        def __call__(self): log.append("call")

    monkeypatch.undo()
    timing.interleaved({"h": Hooked()}, "cpu", rounds=1, warmup=0)
    assert log == ["enter", "call", "leave"]


def test_capture_harness_writes(tmp_path):
    """eval.bench.capture: the tiny run writes one row per batch x strategy and the one-layer
    reduction rows."""
    from eval.bench.capture import main
    res = main(["--preset", "tiny", "--rounds", "2", "--out", str(tmp_path)])
    assert [(v["batch"], v["strategy"]) for v in res["vision_rows"]] == [
        (b, s) for b in (1, 2) for s in ("hiprune", "fopru", "visionzip")]
    assert all(v["sdpa_ms"] > 0 and v["ours_ms"] > 0 for v in res["vision_rows"])
    assert [r["batch"] for r in res["reduction_rows"]] == [1, 2]
    assert "reduction / SDPA tower" in (tmp_path / "capture.md").read_text()


def test_vllm_serving_bench_gpu_checkpoint_is_llava_7b_without_weights(tmp_path):
    """The GPU preset of eval.bench.vllm_serve writes LLaVA-1.5-7B's config and a 336 px processor and
    no weights (vLLM's --load-format dummy fills them)."""
    import json

    from eval.bench.vllm_serve import save_model

    path, extra = save_model("gpu", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    assert extra == ["--load-format", "dummy"] and not list(path.glob("*.safetensors"))
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert (cfg["text_config"]["hidden_size"], cfg["text_config"]["num_hidden_layers"]) == (4096, 32)
    assert cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"] == 24
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(path)
    assert proc.image_processor.crop_size["height"] == 336


def test_a_row_whose_ideal_is_not_faster_is_listed():
    from eval.bench.report import to_markdown
    from eval.bench.sanity import noisy, paired_flags

    row = {"model": "m", "batch": 1, "strategy": "s", "kept": 8,
           "paired": {"unpruned_ms": 10.0, "pruned_ms": 9.0, "ideal_ms": 10.5, "rounds": 5}}
    assert paired_flags(row) == ["ideal not faster than unpruned in the paired rounds (10.5 vs 10.0 ms)"]
    assert paired_flags({**row, "paired": {**row["paired"], "ideal_ms": 8.0}}) == []
    assert paired_flags({**row, "paired": {**row["paired"], "ideal_ms": 8.0, "gpu_other_processes": 2}}) == [
        "2 other process(es) on the GPU"]
    assert noisy(row)[-1].startswith("ideal not faster")
    paired = {"unpruned_ms": 5.4, "pruned_ms": 6.0, "ideal_ms": 5.7, "rounds": 3}
    res = {"machine": "m", "torch": "t", "transformers": "x", "repeats": 3, "warmup": 1, "decode_tokens": 4,
           "rows": [sane_row(paired=paired, paired_pruned_over_unpruned=6.0 / 5.4, paired_pruned_over_ideal=6.0 / 5.7)]}
    md = to_markdown(res)
    assert "| 1.11, 1.053 |" in md
    assert "- qwen2.5-vl-tiny bs=1 hiprune kept=8: ideal not faster than unpruned in the paired rounds (5.7 vs 5.4 ms)" in md
