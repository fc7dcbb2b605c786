"""Timers and memory probes: CUDA events on GPU, ``perf_counter`` on CPU; medians after warm-up."""
from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Callable

import torch


def time_ms(fn: Callable[[], Any], device: str, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events around each call on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_mb(fn: Callable[[], Any], device: str) -> float:
    """Peak memory of one call above what was allocated before it, in MiB.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: resident set size sampled every 0.5 ms
    (an approximation: the allocator may reuse freed pages, so small calls can read ~0).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0, peak[0] - base) / 2**20


def cache_mb(cache: Any) -> float:
    """Bytes held by a transformers KV cache (every layer's keys and values), in MiB."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / 2**20
