"""Peak memory of a stretch of work.

``PeakMemory`` (the runner's cost column): max allocated on CUDA, process resident set size on
CPU. The CPU figure is sampled by a background thread (every 10 ms) from /proc/self/statm,
because getrusage's ru_maxrss is the peak of the whole process lifetime and would charge each row
of a multi-defense run with everything loaded before it. Where /proc is missing (not Linux),
ru_maxrss is the fallback and the figure is a lifetime peak.

``peak_tensor_bytes`` (the benchmarks): the peak of live tensor bytes allocated during a call, on
CPU as on CUDA. Process RSS also counts what the C allocator keeps after tensors are freed, and
that depends on the order of earlier allocations, not only on what the call needs.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import threading
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"


def current_rss_bytes() -> int:
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.mib``: the peak during the block."""

    def __init__(self, device: torch.device, interval_s: float = 0.01):
        self.device, self.interval_s = torch.device(device), interval_s
        self.peak_bytes = 0
        self.samples = 0  # readings the CPU sampler has taken so far
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            self.samples += 1

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20


def peak_tensor_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The peak, while ``fn()`` runs, of the bytes of tensors allocated by it and not yet freed.

    CUDA: max_memory_allocated above the level before the call. CPU: the profiler's memory
    events (slow, for benchmarks only): their running total counts exactly the allocations made
    while it records.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recording:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        recording.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])
