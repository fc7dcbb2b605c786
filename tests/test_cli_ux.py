"""What a newcomer meets on the command line: one-line errors for missing extras (before any
model loads), warnings about words the tokenizer does not know, outputs under ./tokenprune_out,
a short summary by default, help text for every option, no warnings in a normal run."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

import pytest

import tokenprune
from tokenprune.cli import main
from tokenprune.errors import TokenPruneWarning
from tokenprune.runner import ASSETS, DEFAULT_MODEL, unknown_words, unknown_words_message

CLIP = str(ASSETS / "examples" / "clip0.gif")


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: a missing extra must be reported before one."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the missing extra was reported")
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(tokenprune.api, "load", boom)


def _video_folder(tmp_path):
    """A checkpoint folder whose saved processor has a video processor (nothing else is read)."""
    folder = tmp_path / "ov"
    folder.mkdir()
    (folder / "processor_config.json").write_text(json.dumps({"video_processor": {}}))
    return str(folder)


@pytest.mark.parametrize("argv, gone, line", [
    (["run", "--video", CLIP], ["torchvision"],
     'error: tokenprune run --video needs torchvision; pip install "tokenprune[vision]"'),
    (["run", "--model", "VIDEO_FOLDER"], ["torchvision"],
     'error: the processor of ov (a video model) needs torchvision; pip install "tokenprune[vision]"'),
    (["demo", "--port", "0"], ["gradio"], 'error: tokenprune demo needs gradio; pip install "tokenprune[demo]"'),
    (["sweep", "--limit", "1"], ["lmms_eval"], 'error: tokenprune sweep needs lmms-eval; pip install "tokenprune[eval]"'),
    (["fidelity", "--n", "2"], ["tqdm", "matplotlib"],
     'error: tokenprune fidelity needs tqdm and matplotlib; pip install "tokenprune[eval]"'),
    (["fidelity", "--video", "--n", "2"], ["matplotlib", "torchvision"],
     'error: tokenprune fidelity --video needs matplotlib and torchvision; pip install "tokenprune[eval,vision]"'),
], ids=["run-video", "run-video-model", "demo", "sweep", "fidelity", "fidelity-video"])
def test_a_missing_extra_is_one_line_and_status_2(argv, gone, line, tmp_path, monkeypatch, capsys, no_model_load):
    argv = [_video_folder(tmp_path) if x == "VIDEO_FOLDER" else x for x in argv]
    monkeypatch.chdir(tmp_path)
    for name in gone:                    # how `import` sees a module that is not installed
        monkeypatch.setitem(sys.modules, name, None)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [line] and out == ""
    assert not (tmp_path / "tokenprune_out").exists()        # nothing was written either


def test_the_demo_api_checks_gradio_before_loading(monkeypatch, no_model_load):
    from tokenprune._extras import MissingExtraError
    from tokenprune.demo import launch

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(MissingExtraError, match=r'tokenprune demo needs gradio; pip install "tokenprune\[demo\]"'):
        launch(port=0)


class _Words:
    """A minimal word-level tokenizer: ``is_fast`` False takes the per-word path."""
    is_fast = False
    unk_token, unk_token_id = "<unk>", 0
    vocab = {"what": 1, "color": 2}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.vocab.get(w, 0) for w in text.split()]}


def test_unknown_words_are_named_for_any_tokenizer_with_an_unk_token():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)      # the tiny model's ~44-word lowercase vocabulary
    assert unknown_words(tok, "What color is the circle?") == ["What", "circle?"]
    assert unknown_words(tok, "what color is the circle") == []
    msg = unknown_words_message(tok, "What color is the circle?")
    assert msg is not None and "'What', 'circle?'" in msg and tok.unk_token in msg
    assert "try 'what color is the circle'" in msg and str(ASSETS / "examples" / "examples.json") in msg
    assert unknown_words_message(tok, "what color is the cross") is None
    assert unknown_words(_Words(), "what Colour color") == ["Colour"]       # slow tokenizer: word by word

    class _Bytes(_Words):                           # byte-level BPE: no unk token, nothing is unknown
        unk_token = unk_token_id = None
    assert unknown_words(_Bytes(), "anything at all") == [] and unknown_words_message(_Bytes(), "x y") is None


def test_unknown_words_warn_in_the_runner_and_in_one_cli_line(capsys):
    from tokenprune.runner import Runner

    with pytest.warns(TokenPruneWarning, match=r"'What', 'circle\?'"):
        res = Runner().run(tokenprune.runner.open_image(ASSETS / "examples" / "scene3.png"),
                           "What color is the circle?", None, max_new_tokens=2)
    assert len(res.warnings) == 1 and "examples.json" in res.warnings[0]
    assert main(["run", "--strategy", "none", "--prompt", "What color is the circle?", "--overlay", "",
                 "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "warning" in x.lower()]
    assert len(lines) == 1 and lines[0].startswith("warning: the tokenizer does not know 'What', 'circle?'")


def test_run_prints_a_short_summary_and_writes_under_the_cwd_without_warnings(tmp_path, monkeypatch, capsys):
    """The default `tokenprune run`: a handful of lines (answer, tokens in -> kept, timings, where the
    overlay went: ./tokenprune_out/overlay.png), no Python warning of any kind."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run"]) == 0
    out, err = capsys.readouterr()
    assert not caught, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    assert not [x for x in err.splitlines() if "warning" in x.lower()]
    lines = out.strip().splitlines()
    assert len(lines) < 15
    assert "answer:         'blue'" in lines and re.search(r"visual tokens: +256 (→|->) 64 kept", out)
    assert "hiprune (keep=0.25)" in out and "prefill" in out and "FLOPs" in out
    png = tmp_path / "tokenprune_out" / "overlay.png"
    assert f"overlay:        {png}" in lines
    with Image.open(png) as im:
        assert im.width >= 448


def test_run_json_is_the_full_report():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["run", "--json", "--overlay", "", "--budget", "8"]) == 0
    report = json.loads(buf.getvalue())
    assert report["visual_tokens_kept"] == 8 and len(report["kept_indices"][0]) == 8 and "overlay" not in report
    assert buf.getvalue().count("\n") > 8          # indented, unlike --compact


def test_default_outputs_land_under_the_cwd(tmp_path, monkeypatch, capsys):
    """compare, fidelity (and --video) and sweep write to ./tokenprune_out/<command>, never into the
    package's committed eval/results."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tokenprune_out"
    assert main(["compare", "--strategies", "random", "--max-new-tokens", "1"]) == 0
    assert (out / "compare.png").stat().st_size > 0 and f"overlays: {out / 'compare.png'}" in capsys.readouterr().out
    for argv, stem in ((["fidelity"], "fidelity"), (["fidelity", "--video"], "fidelity_video")):
        assert main([*argv, "--n", "2", "--strategies", "random", "--controls"]) == 0
        assert (out / "fidelity" / f"{stem}.json").exists() and (out / "fidelity" / f"{stem}.png").exists()
        assert f"to {out / 'fidelity'}" in capsys.readouterr().out
    if os.environ.get("TOKENPRUNE_REQUIRE_LMMS") != "1":
        pytest.importorskip("lmms_eval")
    assert main(["sweep", "--strategies", "random", "--keeps", "0.5", "--limit", "1"]) == 0
    assert (out / "sweep" / "sweep.json").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"tokenprune_out"}     # nothing else, no eval/results


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser the command line uses (the top level, its subcommands, the eval mains we own)."""
    from tokenprune.cli import parser
    from tokenprune.eval.lmms import sweep
    from tokenprune.eval.synthetic import fidelity, fidelity_video

    top = parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = {"tokenprune": top, **{f"tokenprune {k}": v for k, v in sub.choices.items() if k not in ("bench", "fidelity", "sweep")}}
    out.update({"fidelity": fidelity.parser(), "fidelity --video": fidelity_video.parser(), "sweep": sweep.parser()})
    return out


def test_every_option_has_help_and_descriptions_are_whole():
    for name, p in _parsers().items():
        for action in p._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        if p.description:
            assert p.description.rstrip().endswith((".", ")")), f"{name}: description cut: {p.description!r}"


@pytest.mark.parametrize("argv", [[], ["run"], ["compare"], ["demo"], ["list"], ["bench"], ["fidelity"],
                                  ["fidelity", "--video"], ["sweep"]], ids=lambda a: " ".join(a) or "top")
def test_help_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:")
    if argv in ([], ["fidelity"]):            # --video is documented at the top and in fidelity --help
        assert "--video" in text and "fidelity" in text


def test_parse_command_parses_like_main_and_runs_nothing(no_model_load):
    from tokenprune.cli import parse_command

    assert parse_command(["fidelity", "--video", "--n", "3"]).n == 3          # the video benchmark's parser
    assert parse_command(["fidelity", "--n", "3"]).n == 3 and parse_command(["run", "--json"]).json
    assert parse_command(["sweep", "--keeps", "0.5"]).keeps == [0.5]
    for bad in (["run", "--bogus"], ["fidelity", "--bogus"], ["sweep", "--keeps", "x"]):
        with pytest.raises(SystemExit) as e:
            parse_command(bad)
        assert e.value.code == 2


def test_the_summary_counts_content_tokens_and_names_the_layout_ones():
    """A OneVision video: 512 content tokens + 1 newline reach the LLM; the budget counts content only,
    so the summary says 512 -> 77 and names the newline apart (the JSON keeps the raw counts)."""
    from tokenprune.cli import summary
    from tokenprune.runner import RunResult

    res = RunResult(strategy="holitom", params={"keep": 0.15}, answer="red", tokens_in=513, tokens_kept=78,
                    prefill_ms=10.0, layout_tokens=1)
    line = next(x for x in summary("m", "q", res, None).splitlines() if x.startswith("visual tokens"))
    assert "512" in line and "77 kept (15%)" in line and "+ 1 newline token" in line
    assert res.as_dict()["layout_tokens"] == 1 and res.as_dict()["visual_tokens_in"] == 513
