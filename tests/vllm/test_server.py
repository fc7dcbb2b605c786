"""The OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) on 127.0.0.1 with
the plugin switched on by ``--hf-overrides``: chat completions with a base64 image answer as
tokenprune under transformers (positions="compact"), the prompt is shorter by exactly the pruned
tokens, and concurrent requests get what each gets alone."""
from __future__ import annotations

import base64
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engines import CASES, LLAVA, hf_reference

CONFIG = {"strategy": "hiprune", "budget": 64}
N_TOKENS = 256                      # the shipped LLaVA's visual tokens per image


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from eval.bench.vllm_serve import Server

    srv = Server(LLAVA, ["--enforce-eager"], CONFIG, {"dtype": "float32", "max_model_len": 512, "concurrency": (8,)},
                 tmp_path_factory.mktemp("server") / "server.log")
    try:
        try:
            srv.wait(timeout=420)
        except RuntimeError as e:                       # the server exited or never came up: its log's tail
            pytest.fail(str(e))
        yield srv.base
    finally:
        srv.close()


def _chat(base: str, image: Path, question: str) -> dict:
    data = base64.b64encode(image.read_bytes()).decode()
    return _post(base + "/v1/chat/completions", {
        "model": str(LLAVA), "temperature": 0.0, "max_tokens": 4, "return_token_ids": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            {"type": "text", "text": question}]}]})


def _prompt_tokens(question: str) -> int:
    from transformers import AutoProcessor

    from tokenprune.runner import user_prompt

    proc = AutoProcessor.from_pretrained(LLAVA)
    return len(proc.tokenizer(user_prompt(proc, question))["input_ids"]) + N_TOKENS - 1


def test_chat_with_a_base64_image_answers_as_transformers(server):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(LLAVA)
    for image, question, _ in CASES:
        got = _chat(server, image, question)
        ref_ids, _ = hf_reference(LLAVA, CONFIG["strategy"], {"budget": CONFIG["budget"], "positions": "compact"},
                                  image, question)
        assert got["choices"][0]["token_ids"] == ref_ids, image.name
        # vLLM's incremental detokenizer keeps the word-level tokenizer's leading space
        assert got["choices"][0]["message"]["content"].strip() == tok.decode(ref_ids, skip_special_tokens=True).strip()
        # the scheduler saw the pruned prompt: `budget` placeholders instead of the image's 256
        assert got["usage"]["prompt_tokens"] == _prompt_tokens(question) - (N_TOKENS - CONFIG["budget"])


def test_concurrent_requests_equal_sequential_ones(server):
    seq = [_chat(server, i, q)["choices"][0]["message"]["content"] for i, q, _ in CASES]
    with ThreadPoolExecutor(len(CASES)) as pool:
        together = list(pool.map(lambda c: _chat(server, c[0], c[1])["choices"][0]["message"]["content"], CASES))
    assert together == seq and seq[0].strip() == "blue"
