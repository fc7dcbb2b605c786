"""``tokenprune`` command line.

    tokenprune run [--model PATH] [--strategy hiprune] [--keep 0.25 | --budget N] [--param k=v ...]
                   [--image IMG] [--prompt TEXT] [--max-new-tokens N]
    tokenprune list
    tokenprune bench [microbench options]

Without ``--model`` the embedded default in ``assets/tiny-llava`` is used (no downloads).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "tiny-llava"
DEFAULT_IMAGE = ASSETS / "demo.png"


def _value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _params(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--param expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = _value(v)
    return out


def cmd_run(a: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    import tokenprune

    model_path = a.model or DEFAULT_MODEL
    if not Path(model_path).exists() and a.model is None:
        raise SystemExit(f"embedded default model not found at {model_path}; run "
                         "`python -m tokenprune.eval.make_assets` or pass --model")
    params = _params(a.param)
    if a.keep is not None:
        params["keep"] = a.keep
    if a.budget is not None:
        params["budget"] = a.budget
    if a.strategy and "keep" not in params and "budget" not in params:
        params["keep"] = 0.25
    try:
        model, processor, handle = tokenprune.load(str(model_path), strategy=a.strategy, dtype=torch.float32,
                                                   **params)
    except tokenprune.TokenPruneError as e:
        raise SystemExit(f"error: {e}") from None
    image = Image.open(a.image or DEFAULT_IMAGE).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": a.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=a.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    report: dict[str, Any] = {"model": str(model_path), "strategy": a.strategy, "params": params,
                              "answer": answer}
    if handle is not None and handle.last_stats is not None:
        st = handle.last_stats.as_dict()
        report.update({k: st[k] for k in ("visual_tokens_in", "visual_tokens_kept", "prune_ms",
                                          "flops_before", "flops_after")})
        report["kept_indices"] = st["kept_indices"]
    print(json.dumps(report, indent=None if a.compact else 2))
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    import tokenprune

    print("strategies:", ", ".join(tokenprune.list_strategies()))
    print("families (model_type):", ", ".join(tokenprune.list_families()))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tokenprune", description="visual-token pruning for HF VLMs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="generate an answer for one image with a strategy applied")
    r.add_argument("--model", help="checkpoint folder or hub id (default: the embedded tiny model)")
    r.add_argument("--strategy", default="hiprune", help="strategy name ('none' for no pruning)")
    r.add_argument("--keep", type=float)
    r.add_argument("--budget", type=int)
    r.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="strategy parameter")
    r.add_argument("--image", help="image file (default: assets/demo.png)")
    r.add_argument("--prompt", default="what color is the circle")
    r.add_argument("--max-new-tokens", type=int, default=8)
    r.add_argument("--compact", action="store_true", help="one-line JSON")
    sub.add_parser("list", help="list strategies and model families")
    sub.add_parser("bench", help="CPU micro-benchmark (prune time vs prefill)", add_help=False)
    a, rest = ap.parse_known_args(argv)
    if a.cmd == "bench":
        from tokenprune.eval.microbench import main as bench_main

        bench_main(rest)
        return 0
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.cmd == "run":
        if a.strategy == "none":
            a.strategy = None
        return cmd_run(a)
    return cmd_list(a)


if __name__ == "__main__":
    sys.exit(main())
