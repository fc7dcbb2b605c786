"""``tokenprune`` command line.

    tokenprune run      [--model PATH] [--strategy hiprune] [--keep 0.25 | --budget N] [--param k=v ...]
                        [--image IMG | --video CLIP] [--prompt TEXT] [--overlay out.png] [--json | --compact]
    tokenprune compare  [same model/input options] [--strategies ...] [--out compare.png]
    tokenprune demo     [--model PATH] [--port 7860]            (Gradio app; needs tokenprune[demo])
    tokenprune list
    tokenprune bench    [--preset tiny|cpu|gpu] [--out DIR]     (needs tokenprune[eval])
    tokenprune fidelity [--video] [--model PATH] [--n N] [--out DIR]   (needs tokenprune[eval])
    tokenprune sweep    [--model PATH] [--tasks ...] [--strategies ...] [--keeps ...] [--out DIR]   (needs tokenprune[eval])

Without ``--model`` the embedded default ``assets/tiny-llava-vqa`` (a tiny LLaVA trained on the
synthetic VQA task; ``assets/tiny-ov-video`` for ``--video``) is used: no downloads. Outputs go
to ``./tokenprune_out/`` under the current directory unless a path is given. ``<command> --help``
describes every option.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from tokenprune._extras import TORCHVISION, MissingExtraError, default_out, require, require_all
from tokenprune.config import parse_value
from tokenprune.runner import DEFAULT_IMAGE, DEFAULT_MODEL, RunResult

DEFAULT_QUESTION = "what color is the cross"                 # assets/demo.png: blue
DEFAULT_VIDEO_QUESTION = "what color does the triangle turn"  # a question of the tiny video model


def _params(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --param expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = parse_value(v)
    return out


def _budget(a: argparse.Namespace) -> dict[str, Any]:
    params = _params(a.param)
    if a.keep is not None:
        params["keep"] = a.keep
    if a.budget is not None:
        params["budget"] = a.budget
    if "keep" not in params and "budget" not in params:
        params["keep"] = 0.25
    return params


def _runner(a: argparse.Namespace):
    from tokenprune.runner import DEFAULT_VIDEO_MODEL, Runner

    model = a.model
    if model is None and getattr(a, "video", None):   # the embedded video model for a video input
        model = DEFAULT_VIDEO_MODEL
    return Runner(model, device=a.device, dtype=a.dtype)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (tokens to generate), got {value}")
    return value


def _arrow() -> str:
    """→ where stdout can print it (a legacy Windows code page cannot), else ->."""
    try:
        "→".encode(sys.stdout.encoding or "ascii")
        return "→"
    except (UnicodeEncodeError, LookupError):
        return "->"


def _described(res: RunResult) -> str:
    """``hiprune (keep=0.25)``; ``none (unpruned)``."""
    if res.strategy == "none":
        return "none (unpruned)"
    return f"{res.strategy} (" + ", ".join(f"{k}={v}" for k, v in res.params.items()) + ")"


def summary(model: str, question: str, res: RunResult, overlay: str | None) -> str:
    """The few lines ``tokenprune run`` prints by default (``--json`` for everything)."""
    n_in, n_kept, n_layout = res.tokens_in - res.layout_tokens, res.tokens_kept - res.layout_tokens, res.layout_tokens
    share = f" ({100 * n_kept / n_in:.0f}%)" if n_in else ""
    layout = (f" + {n_layout} newline token{'s' if n_layout > 1 else ''} (layout: always kept, not in the budget)"
              if n_layout else "")
    lines = [f"model:          {model}",
             f"question:       {question}",
             f"strategy:       {_described(res)}",
             f"answer:         {res.answer!r}",
             f"visual tokens:  {n_in} {_arrow()} {n_kept} kept{share}{layout}",
             f"prefill:        {res.prefill_ms:.1f} ms (token selection {res.prune_ms:.1f} ms of it); "
             f"FLOPs {res.flops_ratio:.2f}x of unpruned"]
    if overlay:
        lines.append(f"overlay:        {overlay}")
    return "\n".join(lines)


def _save_overlay(res: RunResult, path: Path) -> None:
    from tokenprune.visualize import LEGEND, annotate

    assert res.overlay is not None
    title = f"{_described(res)}: {res.tokens_kept} / {res.tokens_in} visual tokens kept; answer {res.answer!r}"
    path.parent.mkdir(parents=True, exist_ok=True)
    annotate(res.overlay, [title, LEGEND]).save(path)


def cmd_run(a: argparse.Namespace) -> int:
    from tokenprune.runner import open_image, open_video

    if a.video:     # the OneVision / Qwen-VL video processors import torchvision
        require_all("tokenprune run --video", TORCHVISION)
    strategy = None if a.strategy == "none" else a.strategy
    params = _budget(a) if strategy else {}
    frames = open_video(a.video) if a.video else None       # a bad file is refused before the model loads
    image = None if a.video else open_image(a.image or DEFAULT_IMAGE)
    runner = _runner(a)
    question = a.prompt if a.prompt is not None else DEFAULT_VIDEO_QUESTION if a.video else DEFAULT_QUESTION
    res = runner.run(image, question, strategy, a.max_new_tokens, video=frames, **params)
    overlay = None
    if a.overlay != "":
        path = default_out() / "overlay.png" if a.overlay is None else Path(a.overlay)
        _save_overlay(res, path)
        overlay = str(path)
    if a.json or a.compact:
        report = {"model": runner.name, **res.as_dict()}
        if overlay:
            report["overlay"] = overlay
        if res.warnings:
            report["warnings"] = res.warnings
        print(json.dumps(report, indent=None if a.compact else 2))
    else:
        print(summary(runner.name, question, res, overlay))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    import tokenprune
    from tokenprune.runner import open_image
    from tokenprune.visualize import LEGEND, annotate, grid

    image = open_image(a.image or DEFAULT_IMAGE)
    params = _budget(a)
    runner = _runner(a)
    question = a.prompt if a.prompt is not None else DEFAULT_QUESTION
    rows = [runner.run(image, question, None, a.max_new_tokens)]
    names = a.strategies or tokenprune.strategies_for(runner.model)
    for name in names:
        rows.append(runner.run(image, question, name, a.max_new_tokens, **params))
    base = rows[0].prefill_ms
    head = f"model {runner.name}; question: {question!r}; budget {params}"
    print(head + "\n")
    print("| strategy | answer | visual tokens kept | prefill ms | speedup | prune ms | FLOPs after/before |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.strategy} | {r.answer} | {r.tokens_kept}/{r.tokens_in} | {r.prefill_ms:.1f} | "
              f"{base / r.prefill_ms:.2f}x | {r.prune_ms:.2f} | {r.flops_ratio:.2f} |")
    sheet = grid([r.overlay for r in rows], [f"{r.strategy}: {r.answer} ({r.tokens_kept})" for r in rows],
                 cols=min(4, len(rows)))
    out = default_out() / "compare.png" if a.out is None else Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    annotate(sheet, [head, LEGEND]).save(out)
    print(f"\noverlays: {out}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    require("gradio", "demo", "tokenprune demo")
    from tokenprune.demo import launch

    launch(model=a.model, device=a.device, dtype=a.dtype, port=a.port, port_file=a.port_file)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    import tokenprune

    print("strategies:", ", ".join(tokenprune.list_strategies()))
    print("families (model_type):", ", ".join(tokenprune.list_families()))
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH",
                   help=f"checkpoint folder or hub id (default: {DEFAULT_MODEL.name} in the package's assets)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default: float32)")


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", metavar="FILE", help="image file (default: demo.png in the package's assets)")
    p.add_argument("--prompt", metavar="TEXT",
                   help=f"the question (default: {DEFAULT_QUESTION!r}, with --video {DEFAULT_VIDEO_QUESTION!r}; the "
                        "tiny default models know only the lowercase words of their synthetic questions: see "
                        "assets/examples/examples.json)")
    p.add_argument("--keep", type=float, help="fraction of visual tokens kept per image, in (0, 1] (default 0.25)")
    p.add_argument("--budget", type=int, metavar="N", help="visual tokens kept per image (instead of --keep)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy parameter, e.g. alpha=0.2 (repeatable; `tokenprune list` names the strategies)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=8, metavar="N",
                   help="tokens to generate for the answer (default: 8)")


def _epilog() -> str:
    """The module docstring past its title line, as plain text (the top-level --help)."""
    return (__doc__ or "").split("\n", 1)[-1].replace("``", "").strip("\n").rstrip()


def parser() -> argparse.ArgumentParser:
    """The command line's parser. bench, fidelity and sweep parse their own options (their
    ``--help``); here they are names that pass the rest of the line on."""
    ap = argparse.ArgumentParser(prog="tokenprune", description="Visual-token pruning for Hugging Face VLMs.",
                                 epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="what to do (COMMAND --help: its options)")
    r = sub.add_parser("run", help="answer a question about one image (or video) with a strategy applied",
                       description="Answer a question about one image (or a video) with a pruning strategy "
                                   "applied; prints a short summary (--json: everything) and writes the kept-token overlay.")
    _model_args(r)
    _input_args(r)
    r.add_argument("--video", metavar="FILE",
                   help="a video instead of the image: .gif/.webp/.npy, or .mp4 etc. with decord/av (video models: "
                        "LLaVA-OneVision, Qwen-VL; default model: tiny-ov-video; needs torchvision)")
    r.add_argument("--strategy", default="hiprune", help="strategy name, 'none' for no pruning (default: hiprune)")
    r.add_argument("--overlay", metavar="PNG",
                   help="where the PNG of the kept tokens goes ('' to skip; default: ./tokenprune_out/overlay.png)")
    r.add_argument("--json", action="store_true", help="print the full report as JSON (with every kept index)")
    r.add_argument("--compact", action="store_true", help="the JSON report on one line (implies --json)")
    c = sub.add_parser("compare", help="every strategy on one input: table + one PNG of overlays",
                       description="Every strategy (or those of --strategies) on one image: a markdown table of "
                                   "answers, tokens kept and timings, and one PNG of their overlays.")
    _model_args(c)
    _input_args(c)
    c.add_argument("--strategies", nargs="*", metavar="NAME", help="strategies to compare (default: all the model supports)")
    c.add_argument("--out", metavar="PNG", help="the overlays' PNG (default: ./tokenprune_out/compare.png)")
    d = sub.add_parser("demo", help="the Gradio app (unpruned vs pruned side by side; needs tokenprune[demo])",
                       description="The Gradio app on 127.0.0.1: one question answered unpruned and pruned, side "
                                   "by side, with the overlay and timings. Needs tokenprune[demo].")
    _model_args(d)
    d.add_argument("--port", type=int, default=7860, help="port to serve on; 0 = any free port (default: 7860)")
    d.add_argument("--port-file", metavar="FILE", help="write the port chosen here (for scripts)")
    sub.add_parser("list", help="list strategies and model families", description="List the registered "
                   "strategies and model families (model_type).")
    sub.add_parser("bench", help="speed/memory benchmark: pruned vs unpruned vs ideal (needs tokenprune[eval]; see bench --help)",
                   add_help=False)
    sub.add_parser("fidelity", add_help=False,
                   help="accuracy vs tokens kept on the tiny VQA model; --video: on the tiny video model "
                        "(needs tokenprune[eval]; see fidelity --help)")
    sub.add_parser("sweep", help="strategies x budgets through lmms-eval (needs tokenprune[eval]; see sweep --help)",
                   add_help=False)
    return ap


#: commands whose module parses the rest of the line itself (their own --help)
EVAL_COMMANDS = ("bench", "fidelity", "sweep")


def _eval_command(cmd: str, rest: list[str]) -> tuple[Any, list[str]]:
    """The module that runs ``cmd`` (one of :data:`EVAL_COMMANDS`; ``fidelity --video``: the video
    benchmark's) and the arguments its ``parser()`` / ``main()`` take."""
    if cmd == "bench":
        from tokenprune.eval.bench import run as module
    elif cmd == "sweep":
        from tokenprune.eval.lmms import sweep as module
    elif "--video" in rest:
        from tokenprune.eval.synthetic import fidelity_video as module
        rest = [x for x in rest if x != "--video"]
    else:
        from tokenprune.eval.synthetic import fidelity as module
    return module, rest


def parse_command(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed as :func:`main` parses it, running nothing (SystemExit on a bad line; the
    docs' command lines are checked with it)."""
    ap = parser()
    a, rest = ap.parse_known_args(argv)
    if a.cmd in EVAL_COMMANDS:
        module, args = _eval_command(a.cmd, rest)
        return module.parser().parse_args(args)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return a


def _dispatch(ap: argparse.ArgumentParser, a: argparse.Namespace, rest: list[str]) -> int:
    if a.cmd in EVAL_COMMANDS:
        module, args = _eval_command(a.cmd, rest)
        module.main(args)
        return 0
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"run": cmd_run, "compare": cmd_compare, "demo": cmd_demo, "list": cmd_list}[a.cmd](a)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Our own warnings (:class:`TokenPruneWarning`) as one ``warning: ...`` line on stderr, not
    Python's two-line form with a source line; every other warning is shown as it would be."""
    from tokenprune.errors import TokenPruneWarning

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
            if issubclass(category, TokenPruneWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        # No third-party warning is filtered: none shows in a normal run on transformers 5.17-5.24
        # (the one that did, Qwen-VL's per-frame pixel cap notice, is answered in runner.py).
        yield


def main(argv: list[str] | None = None) -> int:
    from tokenprune.errors import TokenPruneError

    ap = parser()
    a, rest = ap.parse_known_args(argv)
    try:
        with _warnings_as_lines():
            return _dispatch(ap, a, rest)
    except MissingExtraError as e:     # checked before any work: one line, argparse's usage status
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TokenPruneError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
