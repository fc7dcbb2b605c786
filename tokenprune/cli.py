"""``tokenprune`` command line.

    tokenprune run      [--model PATH] [--strategy hiprune] [--keep 0.25 | --budget N] [--param k=v ...]
                        [--image IMG] [--prompt TEXT] [--overlay out.png] [--device cpu] [--dtype float32]
    tokenprune compare  [same model/input options] [--strategies ...] [--out compare.png]
    tokenprune demo     [--model PATH] [--port 7860]            (Gradio app; `pip install tokenprune[demo]`)
    tokenprune list
    tokenprune bench    [--preset tiny|cpu|gpu] [--out DIR]
    tokenprune fidelity [--model PATH] [--n 1000] [--out DIR]
    tokenprune sweep    [--model PATH] [--tasks ...] [--strategies ...] [--keeps ...] [--out DIR]

Without ``--model`` the embedded default ``assets/tiny-llava-vqa`` (a tiny LLaVA trained on the
synthetic VQA task) is used: no downloads.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tokenprune.config import parse_value
from tokenprune.runner import DEFAULT_IMAGE, DEFAULT_MODEL

DEFAULT_QUESTION = "what color is the cross"


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


def cmd_run(a: argparse.Namespace) -> int:
    from tokenprune.runner import open_image, open_video

    strategy = None if a.strategy == "none" else a.strategy
    params = _budget(a) if strategy else {}
    runner = _runner(a)
    if a.video:
        res = runner.run(None, a.prompt, strategy, a.max_new_tokens, video=open_video(a.video), **params)
    else:
        res = runner.run(open_image(a.image or DEFAULT_IMAGE), a.prompt, strategy, a.max_new_tokens, **params)
    report = {"model": runner.name, **res.as_dict()}
    if a.overlay:
        assert res.overlay is not None
        res.overlay.save(a.overlay)
        report["overlay"] = str(a.overlay)
    print(json.dumps(report, indent=None if a.compact else 2))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    import tokenprune
    from tokenprune.runner import open_image
    from tokenprune.visualize import grid

    runner = _runner(a)
    image = open_image(a.image or DEFAULT_IMAGE)
    params = _budget(a)
    rows = [runner.run(image, a.prompt, None, a.max_new_tokens)]
    names = a.strategies or tokenprune.strategies_for(runner.model)
    for name in names:
        rows.append(runner.run(image, a.prompt, name, a.max_new_tokens, **params))
    base = rows[0].prefill_ms
    print(f"model {runner.name}; question: {a.prompt!r}; budget {params}\n")
    print("| strategy | answer | visual tokens kept | prefill ms | speedup | prune ms | FLOPs after/before |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.strategy} | {r.answer} | {r.tokens_kept}/{r.tokens_in} | {r.prefill_ms:.1f} | "
              f"{base / r.prefill_ms:.2f}x | {r.prune_ms:.2f} | {r.flops_ratio:.2f} |")
    sheet = grid([r.overlay for r in rows], [f"{r.strategy}: {r.answer} ({r.tokens_kept})" for r in rows],
                 cols=min(4, len(rows)))
    sheet.save(a.out)
    print(f"\noverlays: {a.out}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from tokenprune.demo import launch

    launch(model=a.model, device=a.device, dtype=a.dtype, port=a.port, port_file=a.port_file)
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    import tokenprune

    print("strategies:", ", ".join(tokenprune.list_strategies()))
    print("families (model_type):", ", ".join(tokenprune.list_families()))
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"checkpoint folder or hub id (default: {DEFAULT_MODEL.name} in assets/)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help="image file (default: assets/demo.png)")
    p.add_argument("--prompt", default=DEFAULT_QUESTION, help="the question")
    p.add_argument("--keep", type=float, help="fraction of visual tokens kept per image (default 0.25)")
    p.add_argument("--budget", type=int, help="visual tokens kept per image")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="strategy parameter")
    p.add_argument("--max-new-tokens", type=_positive_int, default=8)


def main(argv: list[str] | None = None) -> int:
    from tokenprune.errors import TokenPruneError

    ap = argparse.ArgumentParser(prog="tokenprune", description="visual-token pruning for HF VLMs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="answer a question about one image (or video) with a strategy applied")
    _model_args(r)
    _input_args(r)
    r.add_argument("--video", help="a video instead of the image: .gif/.webp/.npy, or .mp4 etc. with decord/av "
                                   "(video models: LLaVA-OneVision, Qwen-VL)")
    r.add_argument("--strategy", default="hiprune", help="strategy name ('none' for no pruning)")
    r.add_argument("--overlay", default="tokenprune_overlay.png", help="PNG of the kept tokens ('' to skip)")
    r.add_argument("--compact", action="store_true", help="one-line JSON")
    c = sub.add_parser("compare", help="every strategy on one input: table + one PNG of overlays")
    _model_args(c)
    _input_args(c)
    c.add_argument("--strategies", nargs="*", help="default: all registered")
    c.add_argument("--out", default="tokenprune_compare.png")
    d = sub.add_parser("demo", help="the Gradio app (unpruned vs pruned side by side)")
    _model_args(d)
    d.add_argument("--port", type=int, default=7860, help="0 = any free port")
    d.add_argument("--port-file", help="write the port chosen here (for scripts)")
    sub.add_parser("list", help="list strategies and model families")
    sub.add_parser("bench", help="speed/memory benchmark: pruned vs unpruned vs ideal (see --help)", add_help=False)
    sub.add_parser("fidelity", help="accuracy vs tokens kept on the tiny VQA model (--video: the video model; see --help)", add_help=False)
    sub.add_parser("sweep", help="strategies x budgets through lmms-eval (needs [eval]; see --help)", add_help=False)
    a, rest = ap.parse_known_args(argv)
    if a.cmd == "sweep":
        from tokenprune.eval.lmms.sweep import main as sweep_main

        sweep_main(rest)
        return 0
    if a.cmd == "bench":
        from tokenprune.eval.bench.run import main as bench_main

        bench_main(rest)
        return 0
    if a.cmd == "fidelity":
        if "--video" in rest:   # the video model and its strategies (HoliTom)
            from tokenprune.eval.synthetic.fidelity_video import main as fidelity_main
            rest = [x for x in rest if x != "--video"]
        else:
            from tokenprune.eval.synthetic.fidelity import main as fidelity_main

        fidelity_main(rest)
        return 0
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return {"run": cmd_run, "compare": cmd_compare, "demo": cmd_demo, "list": cmd_list}[a.cmd](a)
    except TokenPruneError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
