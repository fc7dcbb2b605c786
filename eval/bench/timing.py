"""Timers and memory probes: CUDA events on GPU, ``perf_counter`` on CPU; medians after warm-up.

The cyclic garbage collector is off while a call is timed: a full collection of a process holding
torch + transformers (~400k tracked objects) takes ~200 ms on 2 CPU cores, 30x a tiny model's
forward, and would otherwise land in whichever repeat happens to cross its threshold.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import re
import statistics
import sys
import threading
import time
from typing import Any, Callable, Iterator

import torch
from transformers.generation.streamers import BaseStreamer


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic GC paused (as ``timeit`` does); its previous state restored after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _one_ms(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def time_samples(fn: Callable[[], Any], device: str, repeats: int, warmup: int) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``fn`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    with no_gc():
        return [_one_ms(fn, device) for _ in range(repeats)]


def time_ms(fn: Callable[[], Any], device: str, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events around each call on GPU)."""
    return statistics.median(time_samples(fn, device, repeats, warmup))


# -- interleaved rounds ------------------------------------------------------------------------
#: a warm-up round is "stable" when every column's time is within this share of its previous round's
STABLE = 0.10


def interleaved(fns: dict[str, Callable[[], Any]], device: str, rounds: int, warmup: int = 1,
                max_warmup: int = 8) -> dict[str, list[float]]:
    """ms of each callable over ``rounds`` rounds that call every one once, in an order rotated per
    round, so that a slow spell of the machine (other tenants, clocks, a busy card) hits all columns
    alike and their ratio survives it. Warm-up: at least ``warmup`` rounds, then more (up to
    ``max_warmup``) until every column is within :data:`STABLE` of its previous round. A callable
    with ``enter()`` / ``leave()`` gets them called around its timed call, untimed (e.g. installing
    a strategy's hooks)."""
    names = list(fns)

    def one_round(r: int) -> dict[str, float]:
        out = {}
        for n in names[r % len(names):] + names[:r % len(names)]:
            enter, leave = getattr(fns[n], "enter", None), getattr(fns[n], "leave", None)
            if enter is not None:
                enter()
            try:
                with no_gc():
                    out[n] = _one_ms(fns[n], device)
            finally:
                if leave is not None:
                    leave()
        return out

    prev, r = None, 0
    while warmup > 0 and r < max(warmup, max_warmup):
        cur = one_round(r)
        r += 1
        if r >= warmup and prev is not None and all(abs(cur[n] - prev[n]) <= STABLE * prev[n] for n in names):
            break
        prev = cur
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for n, t in one_round(r + i).items():
            samples[n].append(t)
    return samples


def median_range(key: str, samples: list[float]) -> dict[str, Any]:
    """``{key: median, key_range: [min, max]}`` (nan where a sample is: it fails the sanity rules)."""
    if any(math.isnan(x) for x in samples):
        return {key: float("nan"), f"{key}_range": [float("nan")] * 2}
    return {key: statistics.median(samples), f"{key}_range": [min(samples), max(samples)]}


def paired_stats(samples: dict[str, list[float]]) -> dict[str, Any]:
    """:func:`median_range` of each column of :func:`interleaved` (``{name}_ms``, ``{name}_ms_range``)."""
    out: dict[str, Any] = {"rounds": len(next(iter(samples.values())))}
    for n, v in samples.items():
        out.update(median_range(f"{n}_ms", v))
    return out


def gpu_other_processes() -> int | None:
    """Compute processes on the card other than this one (``nvidia-smi``); None off CUDA or where
    nvidia-smi is missing. A benchmark sharing its card measures the other job too."""
    if not torch.cuda.is_available():
        return None
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.split() if line.strip().isdigit() and int(line) != os.getpid())


# -- other work on the machine -------------------------------------------------------------------
def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds the whole machine was busy or stolen by the hypervisor, this process's
    CPU seconds); None without Linux /proc/stat."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = os.times()
    return (time.perf_counter(), (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system)


class OtherWork:
    """``with OtherWork() as w: ...`` -> ``w.share``: the share of the machine's CPUs that other processes
    (and hypervisor steal) used meanwhile: ~0 on an idle machine; None where it cannot be read.

    On 2 cores with torch's 2 threads, one busy neighbour slows a small forward many times over (each
    parallel region waits for a descheduled thread), so timings taken meanwhile are noted as noisy."""

    share: float | None = None

    def __enter__(self) -> OtherWork:
        self._start = _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _cpu_seconds()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return
        wall, busy, own = (b - a for a, b in zip(self._start, end))
        # clamped: /proc/stat counts in 10 ms ticks, so short blocks can round past either end
        self.share = min(1.0, max(0.0, busy - own) / (wall * (os.cpu_count() or 1)))


# -- peak memory ------------------------------------------------------------------------------
_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise OSError(f"no {field} in {_STATUS}")
    return int(m.group(1))


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def cpu_peak_method() -> str:
    """How this machine's CPU peak is read: ``vmhwm`` (kernel high-water mark after a reset: exact),
    ``sampled`` (VmRSS polled by a thread: may miss spikes shorter than its 0.5 ms period) or, without
    ``/proc`` (macOS), ``ru_maxrss`` (the peak since the process started: an upper bound)."""
    try:
        _status_kib("VmHWM")
    except OSError:
        return "ru_maxrss"
    return "vmhwm" if _reset_hwm() else "sampled"


_METHODS = {
    "vmhwm": "kernel VmHWM after a reset via /proc/self/clear_refs",
    "sampled": "VmRSS sampled every 0.5 ms by a thread",
    "ru_maxrss": "getrusage ru_maxrss: the peak since the process started, an upper bound",
}


def peak_method(device: str) -> str:
    """One line for the report: what ``peak_mb`` measures on ``device``."""
    if device.startswith("cuda"):
        return ("torch.cuda.max_memory_allocated during the call above what was allocated before it "
                "(what the call adds: activations, not weights)")
    return f"peak RSS of the whole process during the call, weights included ({_METHODS[cpu_peak_method()]})"


def _maxrss_kib() -> int:
    import resource  # Unix only: imported where it is needed

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r     # bytes on macOS, KiB on Linux


def _sampled_peak_kib(fn: Callable[[], Any]) -> int:
    peak = [_status_kib("VmRSS")]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_kib("VmRSS"))
            time.sleep(0.0005)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _status_kib("VmRSS"))


def peak_mb(fn: Callable[[], Any], device: str) -> float:
    """Peak memory of one call of ``fn`` in MiB; what it counts on each device: ``peak_method``.

    CPU reports the process's absolute peak RSS, not its growth: after warm-up the allocator reuses
    pages already resident, so growth reads ~0 however much the call touches.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    method = cpu_peak_method()
    if method == "vmhwm" and _reset_hwm():
        fn()
        return _status_kib("VmHWM") / 1024
    if method == "ru_maxrss":
        fn()
        return _maxrss_kib() / 1024
    return _sampled_peak_kib(fn) / 1024


def cache_mb(cache: Any) -> float:
    """Bytes held by a transformers KV cache (every layer's keys and values), in MiB."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / 2**20


# -- decode rate ----------------------------------------------------------------------------------
class TokenClock(BaseStreamer):
    """A ``generate`` streamer that only timestamps what it is handed: the prompt once, then each
    step's tokens. generate copies them to the host first, so on CUDA a stamp follows its step's kernels."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_samples(gen: Callable[[TokenClock], torch.Tensor], prompt_len: int, batch: int, repeats: int,
                   warmup: int) -> tuple[list[float], list[int]]:
    """Decode tokens/s of each of ``repeats`` greedy ``gen(streamer)`` calls, and the new tokens each made.

    The rate is batch x (steps - 1) / (last token's stamp - first token's stamp), both inside the
    same call: no separately timed prefill is subtracted (two noisy medians whose difference can be
    ~0 or negative when the decode is short). A call of fewer than 2 steps has no rate (nan).
    """
    for _ in range(warmup):
        gen(TokenClock())
    rates, new = [], []
    with no_gc():
        for _ in range(repeats):
            clock = TokenClock()
            out = gen(clock)
            steps = clock.stamps[1:]                       # [0] is the prompt, before the prefill
            span = steps[-1] - steps[0] if len(steps) >= 2 else 0.0
            rates.append(batch * (len(steps) - 1) / span if span > 0 else float("nan"))
            new.append(int(out.shape[-1]) - prompt_len)
    return rates, new
