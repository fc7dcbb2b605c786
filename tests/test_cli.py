"""The command line on the embedded default checkpoint (assets/tiny-llava-vqa)."""
from __future__ import annotations

import json

import pytest

from tokenprune.cli import DEFAULT_MODEL, main
from tokenprune.eval.synthetic.questions import ANSWERS


def test_run_on_embedded_default(tmp_path, capsys):
    from PIL import Image

    assert DEFAULT_MODEL.exists()
    png = tmp_path / "o.png"
    assert main(["run", "--strategy", "fopru", "--budget", "16", "--param", "mode=row", "--compact",
                 "--overlay", str(png)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["visual_tokens_kept"] == 16 and report["visual_tokens_in"] == 256
    assert report["params"]["mode"] == "row" and len(report["kept_indices"][0]) == 16
    assert report["answer"] in ANSWERS and report["prefill_ms"] > 0
    with Image.open(png) as im:       # the 224 px overlay enlarged 2x under a title and legend
        assert im.format == "PNG" and im.width == 448 and im.height > 448


def test_run_answers_the_demo_question_unpruned_and_pruned(capsys):
    for strategy in ("none", "hiprune"):
        assert main(["run", "--strategy", strategy, "--compact", "--overlay", ""]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["answer"] == "blue"          # assets/demo.png: "what color is the cross"


def test_bad_input_gives_a_clear_message(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    cases = [(["run", "--param", "bogus=1"], "unknown parameter"),
             (["run", "--keep", "2"], "keep must be"),
             (["run", "--image", str(tmp_path / "missing.png")], "image file not found"),
             (["run", "--image", str(bad)], "cannot read"),
             (["run", "--model", str(tmp_path)], "cannot load a model"),
             (["compare", "--budget", "0"], "budget must be")]
    for argv, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            main(argv)


def test_compare_writes_a_table_and_one_png(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "c.png"
    assert main(["compare", "--strategies", "random", "visionzip", "--keep", "0.2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "strategy" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["none", "random", "visionzip"]
    assert all("51/256" in r for r in rows[1:]) and "256/256" in rows[0]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] == 3 * 256
    assert f"overlays: {out}" in text


def test_list(capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert "hiprune" in out and "llava" in out


def test_bench_smoke(tmp_path):
    """The benchmark at a tiny size: every column is produced and every ratio is finite."""
    import math

    main(["bench", "--preset", "tiny", "--strategies", "hiprune", "fastv", "pool", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert not res["interrupted"] and res["machine"] and res["transformers"]
    assert not res["errors"]
    assert {r["strategy"] for r in res["rows"] if "video" not in r["model"]} == {"hiprune", "fastv", "pool"}
    video = [r for r in res["rows"] if r["model"] == "llava-ov-tiny video"]
    # the video row runs its own list (HoliTom is not an image strategy) minus what the user left out
    assert {r["strategy"] for r in video} == {"holitom", "fastv"}
    assert {r["tokens_in"] for r in video} == {4 * 4 + 1} and {r["kept"] for r in video} == {12 + 1}
    llava = [r for r in res["rows"] if r["model"] == "llava-tiny"]
    qwen = [r for r in res["rows"] if r["model"] == "qwen2.5-vl-tiny"]
    ov = [r for r in res["rows"] if r["model"] == "llava-ov-tiny"]
    assert len(llava) == 3 * 2 * 2 and len(qwen) == len(ov) == 3   # strategies x budgets x batches
    assert {r["kept"] for r in qwen} == {8} and {r["tokens_in"] for r in qwen} == {24}
    assert {r["tokens_in"] for r in ov} == {70} and {r["kept"] for r in ov} == {8 + 6}   # + 6 newlines
    for r in res["rows"]:
        for key in ("ttft_ms", "unpruned_ttft_ms", "ideal_ttft_ms", "llm_ms", "vision_ms", "prune_ms", "kv_mb",
                    "pruned_over_unpruned", "pruned_over_ideal", "overhead_share", "flops_ratio", "peak_mb"):
            assert math.isfinite(r[key]), (key, r)
        assert r["kept"] in (16, 14, 13, 8, 4) and r["kv_mb"] <= r["unpruned_kv_mb"]
    assert any("decode_tok_s" in r for r in res["rows"])
    assert {v["strategy"] for v in res["vision_rows"]} == {"hiprune"}   # reference mode: attention strategies
    assert all(v["agreement"] == 1.0 for v in res["vision_rows"])       # same selection as the eager reference
    for name in ("bench_tiny.md", "bench_tiny_ttft.png", "bench_tiny_overhead.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_run_on_a_saved_qwen_checkpoint(kind, tmp_path, capsys):
    """--model with a Qwen folder: answer, counts of its size-dependent grid, an overlay of merged
    patches in original-image coordinates."""
    from PIL import Image

    from tokenprune.eval.tiny import build_qwen, build_qwen_processor

    build_qwen(kind).save_pretrained(tmp_path / "m")
    build_qwen_processor(kind).save_pretrained(tmp_path / "m")
    img = tmp_path / "in.png"
    Image.new("RGB", (230, 150), (40, 90, 200)).save(img)
    png = tmp_path / "o.png"
    assert main(["run", "--model", str(tmp_path / "m"), "--image", str(img), "--strategy", "visionzip",
                 "--keep", "0.25", "--overlay", str(png), "--compact"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    grid = build_qwen_processor(kind).image_processor(Image.open(img), return_tensors="pt")["image_grid_thw"][0]
    n = int(grid.prod()) // 4                      # the size-dependent number of merged tokens
    assert report["visual_tokens_in"] == n
    assert report["visual_tokens_kept"] == round(0.25 * n) == len(report["kept_indices"][0])
    with Image.open(png) as im:       # in original-image coordinates, enlarged 2x under a title
        assert im.format == "PNG" and im.width == 2 * 230 and im.height > 2 * 150


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny LLaVA-OneVision and a tiny Qwen2-VL saved with their real processors."""
    from tokenprune.eval.tiny import build_anyres, build_anyres_processor, build_qwen, build_qwen_processor

    root = tmp_path_factory.mktemp("models")
    build_anyres("llava_onevision").save_pretrained(root / "ov")
    build_anyres_processor("llava_onevision").save_pretrained(root / "ov")
    build_qwen("qwen2_vl").save_pretrained(root / "qwen")
    build_qwen_processor("qwen2_vl").save_pretrained(root / "qwen")
    return root


def _gif(path, frames=8, size=(80, 64)):
    from PIL import Image

    ims = [Image.new("RGB", size, (30 * i % 255, 90, 200 - 20 * i)) for i in range(frames)]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=100)
    return path


def test_run_anyres_image_draws_base_and_canvas(saved_models, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("RGB", (112, 84), (200, 40, 40)).save(img)
    png = tmp_path / "o.png"
    assert main(["run", "--model", str(saved_models / "ov"), "--image", str(img), "--strategy", "hiprune",
                 "--keep", "0.3", "--overlay", str(png), "--compact"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["visual_tokens_in"] == 70                  # 16 base + 6 x (8 + newline) for 112 x 84
    assert report["visual_tokens_kept"] == round(0.3 * 64) + 6
    with Image.open(png) as im:                              # two 256 px panels side by side
        assert im.format == "PNG" and im.width == 2 * 256


@pytest.mark.parametrize("model", ["qwen", "ov"])
def test_run_on_a_video(saved_models, model, tmp_path, capsys):
    from PIL import Image

    gif = _gif(tmp_path / "clip.gif")
    png = tmp_path / "o.png"
    assert main(["run", "--model", str(saved_models / model), "--video", str(gif), "--strategy", "holitom",
                 "--keep", "0.25", "--overlay", str(png), "--compact"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = report["visual_tokens_in"]
    # Qwen2-VL: 4 temporal patches of the processor's grid; OneVision: 8 pooled frames + 1 newline
    content = n if model == "qwen" else n - 1
    assert report["visual_tokens_kept"] == round(0.25 * content) + (n - content)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 256


def test_video_errors_are_clear(saved_models, tmp_path):
    gif = _gif(tmp_path / "clip.gif")
    bad = tmp_path / "bad.gif"
    bad.write_text("not a video")
    for argv, msg in [(["run", "--model", str(DEFAULT_MODEL), "--video", str(gif)], "take no video input"),
                      (["run", "--model", str(saved_models / "qwen"), "--video", str(bad)], "cannot read"),
                      (["run", "--model", str(saved_models / "qwen"), "--video", str(tmp_path / "x.gif")], "not found")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert msg in str(e.value)


def test_run_video_uses_the_embedded_video_model(capsys):
    """`run --video` without --model: the shipped tiny LLaVA-OneVision video model answers the demo
    clip's question (unpruned and with HoliTom at 25%: exact budget + the newline)."""
    from tokenprune.runner import ASSETS

    meta = json.loads((ASSETS / "examples" / "clips.json").read_text())[0]
    clip = str(ASSETS / meta["video"])
    answers = []
    for extra in (["--strategy", "none"], ["--strategy", "holitom", "--keep", "0.25"]):
        assert main(["run", "--video", clip, "--prompt", meta["question"], "--compact", "--overlay", "", *extra]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["model"].endswith("tiny-ov-video")
        answers.append(report["answer"].split()[0])
    assert report["visual_tokens_kept"] == round(0.25 * 512) + 1
    assert answers == [meta["answer"]] * 2
