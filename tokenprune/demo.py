"""Gradio demo: the same question answered by the unpruned and the pruned model, side by side,
with the kept-token overlay, token counts, prefill times and the speedup.

    tokenprune demo [--model PATH] [--port 7860]        (needs `pip install "tokenprune[demo]"`)

Offline: analytics off, no share link, no server-side rendering. One model is loaded; requests
are serialised by the runner's lock, so concurrent users get what each would get alone.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from ._extras import require
from .api import strategies_for
from .config import parse_value
from .errors import TokenPruneError
from .runner import ASSETS, Runner

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_params(text: str) -> dict[str, Any]:
    """``"alpha=0.2, mode=row"`` -> ``{"alpha": 0.2, "mode": "row"}`` (ValueError on bad syntax)."""
    out: dict[str, Any] = {}
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"strategy parameters are key=value pairs separated by commas; got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def compare(runner: Runner, image: Any, question: str, strategy: str, keep: float, params: str,
            video: Any = None):
    """The app's one endpoint. Returns (unpruned answer, pruned answer, overlay, tokens, timing,
    message); on bad input every output but the message is empty; the message warns of words of the
    question the tokenizer does not know. ``video``: a file path (the upload), used instead of the
    image when given."""
    from .runner import open_image, open_video

    empty = ("", "", None, "", "")
    try:
        if isinstance(image, (str, Path)):    # an upload's path: bounded before it is decoded
            image = open_image(image)
        frames = open_video(video) if video else None
        if image is None and frames is None:
            raise ValueError("upload an image (or a video) first")
        kw = parse_params(params)
        if "budget" not in kw:          # a budget typed in the parameters wins over the slider
            kw.setdefault("keep", float(keep))
        source = None if frames is not None else image
        full = runner.run(source, question, None, video=frames)
        pruned = runner.run(source, question, strategy, video=frames, **kw)
    except (TokenPruneError, ValueError) as e:
        return (*empty, f"**Error:** {e}")
    except Exception as e:  # never a traceback page: say what failed
        return (*empty, f"**Error:** {type(e).__name__}: {e}")
    tokens = f"{pruned.tokens_kept} / {pruned.tokens_in} visual tokens kept"
    timing = (f"prefill {full.prefill_ms:.1f} ms unpruned, {pruned.prefill_ms:.1f} ms pruned "
              f"(speedup {full.prefill_ms / pruned.prefill_ms:.2f}x); selection {pruned.prune_ms:.2f} ms; "
              f"FLOPs {pruned.flops_ratio:.2f}x")
    message = "\n\n".join(f"**Warning:** {w}" for w in pruned.warnings)
    return full.answer, pruned.answer, pruned.overlay, tokens, timing, message


def build(runner: Runner):
    import gradio as gr

    examples_file = ASSETS / "examples" / "examples.json"
    examples = []
    if runner.name == str(ASSETS / "tiny-llava-vqa") and examples_file.exists():
        examples = [[str(ASSETS / e["image"]), e["question"]] for e in json.loads(examples_file.read_text())]
    with gr.Blocks(title="tokenprune demo", analytics_enabled=False) as app:
        gr.Markdown(f"### tokenprune — visual-token pruning\nModel: `{Path(runner.name).name}` "
                    f"({runner.family.name} family, "
                    + (f"{runner.family.tokens_per_image} visual tokens per image)" if runner.family.tokens_per_image
                       else "visual tokens per image depend on its size)"))
        with gr.Row():
            with gr.Column():
                # a file path, not a decoded image: open_image bounds its size before decoding
                image = gr.Image(type="filepath", image_mode=None, label="image", elem_id="image")
                video = gr.File(label="or a video (.gif, .webp, .npy, .mp4) — video models only",
                                file_types=[".gif", ".webp", ".npy", ".mp4", ".avi", ".mov", ".mkv"],
                                type="filepath", elem_id="video")
                question = gr.Textbox(label="question", value="what color is the cross", elem_id="question")
                strategy = gr.Dropdown(strategies_for(runner.model), value="hiprune", label="strategy", elem_id="strategy")
                keep = gr.Slider(0.02, 1.0, value=0.25, step=0.01, label="keep (fraction of visual tokens)",
                                 elem_id="keep")
                params = gr.Textbox(label="strategy parameters (key=value, ...)", value="", elem_id="params")
                submit = gr.Button("Run unpruned and pruned", variant="primary", elem_id="submit")
            with gr.Column():
                with gr.Row():
                    full = gr.Textbox(label="answer, unpruned", elem_id="answer_full")
                    pruned = gr.Textbox(label="answer, pruned", elem_id="answer_pruned")
                overlay = gr.Image(type="pil", format="png", label="kept tokens", elem_id="overlay")
                tokens = gr.Textbox(label="tokens", elem_id="tokens")
                timing = gr.Textbox(label="timing", elem_id="timing")
                message = gr.Markdown(elem_id="message")
        if examples:
            gr.Examples(examples, [image, question])
        submit.click(lambda *a: compare(runner, *a), [image, question, strategy, keep, params, video],
                     [full, pruned, overlay, tokens, timing, message], api_name="compare")
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str | None = None, device: str = "cpu", dtype: str = "float32", port: int = 7860,
           port_file: str | None = None, block: bool = True):
    require("gradio", "demo", "tokenprune demo")      # before the model is loaded
    runner = Runner(model, device=device, dtype=dtype)
    app = build(runner)
    port = port or free_port()
    if port_file:
        Path(port_file).write_text(str(port))
    from .runner import MAX_FILE_BYTES

    app.launch(server_name="127.0.0.1", server_port=port, share=False, ssr_mode=False,
               prevent_thread_lock=not block, show_error=False, max_file_size=MAX_FILE_BYTES)
    return app
