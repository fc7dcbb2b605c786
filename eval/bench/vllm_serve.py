"""Serving throughput under vLLM (issue 25): the OpenAI-compatible server, unpruned and with the
tokenprune plugin, in one run; requests/s, output tokens/s and TTFT (median, p90) at each concurrency.

Runs in the vLLM environment (``.ci/setup-vllm``)::

    .ci/venv-vllm/bin/python -m eval.bench.vllm_serve --preset cpu --out eval/results/vllm_cpu
    python -m eval.bench.vllm_serve --preset gpu --out eval/results/vllm_gpu     # a GPU box with vllm

``cpu``: the mid-size random LLaVA-1.5 of the CPU bench (336 px, 576 tokens; 12-layer 256-wide tower,
8-layer 512-wide LLM), real weights file. ``gpu``: LLaVA-1.5-7B's real config with vLLM's dummy
weights (``--load-format dummy``; nothing is downloaded). Every request sends one 336 px image and
asks for exactly ``--max-tokens`` tokens (``ignore_eos``), so unpruned and pruned decode the same
amount; TTFT is the time to the first streamed chunk (vLLM sends it with the first token)."""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"concurrency": (1, 4, 16), "requests": (4, 16, 32), "max_tokens": 16, "budget": 64,
            "dtype": "float32", "max_model_len": 1024},
    "gpu": {"concurrency": (1, 4, 16, 32), "requests": (8, 32, 64, 128), "max_tokens": 64, "budget": 64,
            "dtype": "bfloat16", "max_model_len": 2048},
    "tiny": {"concurrency": (1, 2), "requests": (2, 4), "max_tokens": 4, "budget": 16,
             "dtype": "float32", "max_model_len": 512},
}


def save_model(preset: str, path: Path) -> tuple[Path, list[str]]:
    """Write the preset's checkpoint folder (config, processor, weights unless dummy) and return it with
    the extra server arguments it needs."""
    from ..tiny import build_processor, mid_llava_config

    if preset == "gpu":
        from .presets import llava15_7b_config

        cfg = llava15_7b_config()
        cfg.architectures = ["LlavaForConditionalGeneration"]     # vLLM picks its model class by this
        cfg.save_pretrained(path)
        build_processor(image_size=336, patch_size=14).save_pretrained(path)
        return path, ["--load-format", "dummy"]
    if preset == "tiny":              # the shipped tiny LLaVA (vLLM's CPU attention needs head_dim >= 32)
        return Path(__file__).resolve().parents[2] / "assets" / "tiny-llava-vqa", []
    import torch
    from transformers import LlavaForConditionalGeneration

    cfg = mid_llava_config()
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)
    build_processor(image_size=cfg.vision_config.image_size, patch_size=14).save_pretrained(path)
    return path, []


def image_url(seed: int, size: int = 336) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (``vllm serve`` fails on the
    vllm-cpu package name), stopped on exit."""

    def __init__(self, model: Path, extra: list[str], tokenprune: dict[str, Any] | None, p: dict[str, Any],
                 log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
               "127.0.0.1", "--port", str(self.port), "--dtype", p["dtype"], "--max-model-len",
               str(p["max_model_len"]), "--max-num-seqs", str(max(p["concurrency"])), "--limit-mm-per-prompt",
               json.dumps({"image": 1}), "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
               "--seed", "0", *extra]
        if tokenprune is not None:
            cmd += ["--hf-overrides", json.dumps({"tokenprune": tokenprune})]
        self.log = log
        self.out = open(log, "w")
        env = dict(os.environ)
        if p["dtype"] == "float32":       # CPU: a fixed KV cache (GiB) instead of a share of all memory
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        self.model = str(model)

    def wait(self, timeout: float = 900) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"server not up after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()

    def chat(self, url: str, max_tokens: int) -> dict[str, float]:
        """One streamed chat completion: TTFT (first chunk), end-to-end time, output tokens."""
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "what is in the image"}]}]}
        req = urllib.request.Request(self.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        ttft, tokens, prompt = None, 0, 0
        with urllib.request.urlopen(req, timeout=1800) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - t0
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    tokens, prompt = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
        return {"ttft_s": ttft or float("nan"), "e2e_s": time.perf_counter() - t0, "output_tokens": tokens,
                "prompt_tokens": prompt}


def measure(server: Server, concurrency: int, n: int, max_tokens: int, urls: list[str]) -> dict[str, Any]:
    server.chat(urls[0], max_tokens)                                   # warm-up (and the first compile)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(lambda i: server.chat(urls[i % len(urls)], max_tokens), range(n)))
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_s"] for r in res)
    out_tok = sum(r["output_tokens"] for r in res)
    return {"concurrency": concurrency, "requests": n, "wall_s": wall, "requests_per_s": n / wall,
            "prompt_tokens": sorted({r["prompt_tokens"] for r in res}),
            "output_tokens_per_s": out_tok / wall, "output_tokens": out_tok,
            "ttft_median_ms": 1e3 * statistics.median(ttft), "ttft_p90_ms": 1e3 * ttft[math.ceil(0.9 * len(ttft)) - 1]}   # nearest rank


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    except Exception:
        pass
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def run(preset: str, out: Path, strategy: str) -> dict[str, Any]:
    from tqdm import tqdm

    p = PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tokenprune_vllm_"))       # the checkpoint never lands in out/
    model, extra = save_model(preset, tmp / "model")
    vc = json.loads((model / "config.json").read_text())["vision_config"]
    size, n_visual = vc["image_size"], (vc["image_size"] // vc["patch_size"]) ** 2
    urls = [image_url(s, size) for s in range(8)]
    configs = {"unpruned": None, f"{strategy} {p['budget']}": {"strategy": strategy, "budget": p["budget"]}}
    if not any(e.name == "tokenprune" for e in entry_points(group="vllm.general_plugins")):
        raise SystemExit("error: tokenprune's vLLM plugin is not registered in this environment (install tokenprune "
                         "here: pip install -e .); the pruned server would silently run unpruned")
    rows = []
    with tqdm(total=len(configs) * len(p["concurrency"]), desc="vllm serve") as bar:
        for name, tp in configs.items():
            server = Server(model, extra, tp, p, tmp / f"server_{name.split()[0]}.log")   # tail shown on failure
            try:
                server.wait()
                for c, n in zip(p["concurrency"], p["requests"]):
                    rows.append({"config": name, **measure(server, c, n, p["max_tokens"], urls)})
                    bar.update()
            finally:
                server.close()
    shutil.rmtree(tmp, ignore_errors=True)
    # the plugin was on: every pruned prompt is shorter by exactly the pruned placeholders
    unpruned = {t for r in rows if r["config"] == "unpruned" for t in r["prompt_tokens"]}
    pruned = {t for r in rows if r["config"] != "unpruned" for t in r["prompt_tokens"]}
    if pruned != {t - (n_visual - p["budget"]) for t in unpruned}:
        raise RuntimeError(f"prompt lengths {sorted(pruned)} (pruned) vs {sorted(unpruned)} (unpruned): not "
                           f"{n_visual - p['budget']} placeholders fewer")
    import vllm

    res = {"machine": machine(), "preset": preset, "vllm": vllm.__version__, "max_tokens": p["max_tokens"],
           "visual_tokens": n_visual, "budget": p["budget"], "rows": rows}
    (out / "vllm_serve.json").write_text(json.dumps(res, indent=1))
    (out / "vllm_serve.md").write_text(to_markdown(res))
    return res


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"# vLLM serving throughput — preset {res['preset']}", "",
             f"Machine: {res['machine']}; vLLM {res['vllm']}; one image ({res['visual_tokens']} visual tokens) and "
             f"exactly {res['max_tokens']} output tokens per request; OpenAI-compatible server, streamed.", "",
             "| config | concurrency | requests | req/s | output tok/s | TTFT median ms | TTFT p90 ms | vs unpruned (req/s) |",
             "|---|---|---|---|---|---|---|---|"]
    base = {r["concurrency"]: r["requests_per_s"] for r in res["rows"] if r["config"] == "unpruned"}
    for r in res["rows"]:
        ratio = r["requests_per_s"] / base[r["concurrency"]] if r["concurrency"] in base else float("nan")
        lines.append(f"| {r['config']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['output_tokens_per_s']:.1f} | {r['ttft_median_ms']:.0f} | {r['ttft_p90_ms']:.0f} | "
                     f"{ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--strategy", default="hiprune", help="a vision-stage strategy (default: hiprune)")
    ap.add_argument("--out", type=Path, default=Path("tokenprune_out/vllm_serve"))
    a = ap.parse_args(argv)
    res = run(a.preset, a.out, a.strategy)
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
