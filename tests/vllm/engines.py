"""Shared helpers of the vLLM tests: engines, prompts, and the transformers reference."""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
LLAVA = ROOT / "assets" / "tiny-llava-vqa"
DEMO = ROOT / "assets" / "demo.png"
EXAMPLES = [(ROOT / "assets" / e["image"], e["question"], e["answer"])
            for e in json.loads((ROOT / "assets" / "examples" / "examples.json").read_text())]
CASES = [(DEMO, "what color is the cross", "blue")] + EXAMPLES


def engine(model: Path | str, tokenprune: dict[str, Any] | None = None, **kw: Any):
    """An offline vLLM engine; caches off so that every request encodes its image."""
    from vllm import LLM

    args: dict[str, Any] = dict(dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=8,
                                limit_mm_per_prompt={"image": 1}, enable_prefix_caching=False,
                                mm_processor_cache_gb=0, seed=0)
    args.update(kw)
    if tokenprune is not None:
        args["hf_overrides"] = {"tokenprune": tokenprune}
    return LLM(str(model), **args)


def close(llm: Any) -> None:
    """Free an in-process engine so the next one can start."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def prompt(question: str, model: Path = LLAVA) -> str:
    from transformers import AutoProcessor

    from tokenprune.runner import user_prompt

    return user_prompt(AutoProcessor.from_pretrained(model), question)


def request(image: Path, question: str, model: Path = LLAVA) -> dict[str, Any]:
    return {"prompt": prompt(question, model), "multi_modal_data": {"image": Image.open(image).convert("RGB")}}


def generate(llm: Any, requests: list[dict[str, Any]], max_tokens: int = 4) -> list[list[int]]:
    """Greedy output token ids per request (in request order)."""
    from vllm import SamplingParams

    outs = llm.generate(requests, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def kept(llm: Any) -> list[list[int]]:
    """The plugin's recent selections (per image, ascending kept placeholder indices), then cleared."""
    def take(model: Any) -> list[list[int]]:
        got = [t.tolist() for t in getattr(model, "tokenprune_kept", [])]
        if hasattr(model, "tokenprune_kept"):
            model.tokenprune_kept.clear()
        return got

    return llm.apply_model(take)[0]


_HF: dict[str, Any] = {}


def hf_reference(model: Path, strategy: str | None, params: dict[str, Any], image: Path, question: str,
                 max_tokens: int = 4) -> tuple[list[int], list[list[int]]]:
    """tokenprune under transformers: (greedy new token ids, kept indices per image)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import tokenprune

    key = str(model)
    if key not in _HF:
        _HF[key] = (AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval(),
                    AutoProcessor.from_pretrained(model))
    m, proc = _HF[key]
    inputs = proc(images=Image.open(image).convert("RGB"), text=prompt(question, model), return_tensors="pt")
    handle = tokenprune.apply(m, strategy, **params) if strategy else None
    try:
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        idx = [t.tolist() for t in handle.last_stats.kept_indices[0]] if handle else []
    finally:
        if handle:
            handle.remove()
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return new, idx
