"""The lmms-eval model: any supported HF checkpoint, any strategy, per-sample token counts and
time to first token.

    lmms-eval --model tokenprune \\
      --model_args pretrained=<path>,strategy=hiprune,keep=0.333,alpha=0.1,dtype=bfloat16,device_map=cuda:0 \\
      --tasks <task> --batch_size 1 --output_path out --log_samples

``strategy=none`` (default) runs the unpatched model with the same prompt building as lmms-eval's
own ``llava_hf`` chat wrapper (processor chat template on the doc's messages, greedy generate with
pad/eos = the tokenizer's eos), so scores are comparable with published lmms-eval numbers.
Every other key of ``model_args`` is a strategy parameter (``keep``, ``budget``, ``alpha``, ...).

Per sample, the samples file's ``token_counts`` holds ``input_tokens`` (LLM input after pruning),
``output_tokens``, ``visual_tokens_in``, ``visual_tokens_kept``, ``ttft_ms`` and ``prune_ms``; the
results' ``throughput`` block holds their totals / means (``avg_visual_tokens_in`` etc.).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm

import tokenprune
from tokenprune.runner import to_model, user_prompt

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


@dataclass
class PruneCounts(TokenCounts):
    """lmms-eval's TokenCounts plus what pruning did to this sample (written to the samples file)."""

    visual_tokens_in: int | None = None
    visual_tokens_kept: int | None = None
    ttft_ms: float | None = None
    prune_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().to_dict()
        for k in ("visual_tokens_in", "visual_tokens_kept", "ttft_ms", "prune_ms"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


class _FirstForward:
    """Time from ``start()`` to the end of the model's first forward (the prefill of generate)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t0 = self.t1 = None
        self._h = model.register_forward_hook(self._post)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.t0, self.t1 = time.perf_counter(), None

    def _post(self, *a: Any) -> None:
        if self.t1 is None:
            if self.cuda:
                torch.cuda.synchronize()
            self.t1 = time.perf_counter()

    def ms(self) -> float:
        return (self.t1 - self.t0) * 1000 if self.t0 is not None and self.t1 is not None else float("nan")

    def close(self) -> None:
        self._h.remove()


class TokenPruneChat(lmms):
    is_simple = False

    def __init__(self, pretrained: str, strategy: str = "none", device: str = "cpu", dtype: str = "auto",
                 device_map: str | None = None, attn_implementation: str | None = None, batch_size: int = 1,
                 max_batch_size: int | None = None, trust_remote_code: bool = False, use_cache: bool = True,
                 **params: Any) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.strategy = None if strategy in (None, "none", "") else strategy
        self.params = params
        self.model, self.processor, self.handle = tokenprune.load(
            pretrained, self.strategy, dtype=DTYPES[dtype], device_map=device_map or None,
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **params)
        local_rank = os.environ.get("LOCAL_RANK")
        if device_map in (None, "") and local_rank is not None and str(device).startswith("cuda"):
            device = f"cuda:{local_rank}"      # one GPU per process under accelerate / torchrun
        if device_map in (None, ""):
            self.model.to(device)
        self._device = next(self.model.parameters()).device
        self.processor.tokenizer.padding_side = "left"
        self.tokenizer = self.processor.tokenizer
        self.family = tokenprune.api.family_for(self.model)
        self.batch_size_per_gpu = int(batch_size)
        self.use_cache = use_cache
        self.pretrained = pretrained

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # -- prompt building ---------------------------------------------------------------------
    def _prompt(self, request: Instance) -> tuple[str, list, dict]:
        _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
        chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        images, videos, _ = chat.extract_media()
        if videos:
            raise NotImplementedError("video input needs a video family (LLaVA-OneVision / Qwen2-VL)")
        text = self.processor.apply_chat_template(chat.model_dump()["messages"], tokenize=False,
                                                  add_generation_prompt=True)
        return text, images, dict(gen_kwargs)

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, prompts: list[tuple[str, list, dict]]) -> list[GenerationResult]:
        texts = [p[0] for p in prompts]
        # one list of images per prompt: the batched form every processor accepts (Gemma 3's refuses a
        # flat list for a batch)
        images = [list(p[1]) for p in prompts]
        gen = prompts[0][2]
        inputs = self.processor(images=images if any(images) else None, text=texts, return_tensors="pt", padding=True)
        inputs = to_model(inputs, self.model, self.device)
        temperature = gen.get("temperature", 0) or 0
        eos = self.tokenizer.eos_token_id
        timer = _FirstForward(self.model, self.device)
        timer.start()
        try:
            out = self.model.generate(
                **inputs, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=gen.get("top_p"), num_beams=gen.get("num_beams", 1),
                max_new_tokens=gen.get("max_new_tokens", 1024), use_cache=self.use_cache,
                pad_token_id=eos, eos_token_id=eos)
        finally:
            timer.close()
        new = out[:, inputs["input_ids"].shape[1]:]
        answers = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        until = gen.get("until") if self.is_simple else None
        stats = self.handle.last_stats if self.handle is not None else None
        visual = inputs["input_ids"] == self.family.image_token_id
        prompt_len = inputs["attention_mask"].sum(1)
        results = []
        for i, answer in enumerate(answers):
            for stop in ([until] if isinstance(until, str) else until or []):
                if stop:
                    answer = answer.split(stop)[0]
            n_in = int(visual[i].sum())
            kept = int(stats.visual_tokens_kept[i]) if stats is not None else n_in
            n_out = int((new[i] != eos).sum()) + int(bool((new[i] == eos).any()))
            results.append(GenerationResult(text=answer, token_counts=PruneCounts(
                input_tokens=int(prompt_len[i]) - (n_in - kept), output_tokens=n_out,
                visual_tokens_in=n_in, visual_tokens_kept=kept, ttft_ms=timer.ms(),
                prune_ms=stats.prune_ms if stats is not None else 0.0)))
        return results

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult] = []
        bs = max(1, self.batch_size_per_gpu)
        start = time.time()
        for s in tqdm(range(0, len(requests), bs), disable=self.rank != 0, desc="tokenprune responding"):
            chunk = requests[s:s + bs]
            prompts = [self._prompt(r) for r in chunk]
            # one batch per identical generation kwargs (lmms-eval groups them the same way)
            if any(p[2] != prompts[0][2] for p in prompts):
                for p in prompts:
                    results += self._generate([p])
            else:
                results += self._generate(prompts)
        elapsed = time.time() - start
        counts = [r.token_counts for r in results]
        gen_tokens = sum(c.output_tokens or 0 for c in counts)
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=gen_tokens,
                    avg_speed=gen_tokens / elapsed if elapsed > 0 else 0.0,
                    additional_metrics={
                        "total_requests": len(results), "rank": self.rank,
                        "visual_tokens_in": sum(c.visual_tokens_in for c in counts),
                        "visual_tokens_kept": sum(c.visual_tokens_kept for c in counts),
                        "mean_ttft_ms": sum(c.ttft_ms for c in counts) / max(1, len(counts)),
                        "mean_prune_ms": sum(c.prune_ms for c in counts) / max(1, len(counts)),
                        "strategy": self.strategy or "none"})
        return results

    #: set by ``sweep``: the evaluator's ``clean()`` would delete the model after each run
    keep_loaded: bool = False

    def clean(self) -> None:
        if not self.keep_loaded:
            super().clean()

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("tokenprune evaluates generation tasks (generate_until)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported")


class TokenPruneSimple(TokenPruneChat):
    """Simple style: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` requests; the
    images go first in the user turn, then the context, through the processor's chat template."""

    is_simple = True

    def _prompt(self, request: Instance) -> tuple[str, list, dict]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
        if any(not hasattr(v, "size") for v in visuals):
            raise NotImplementedError("only image visuals are supported by the loaded family")
        text = user_prompt(self.processor, context, len(visuals))
        return text, [v.convert("RGB") for v in visuals], dict(gen_kwargs)
