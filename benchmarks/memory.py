"""Peak memory of a block of work: CUDA's allocator peak, or sampled resident memory on the CPU."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["PeakMemory", "allocation_peak", "rss_bytes"]

_PAGE = 4096


def rss_bytes() -> int:
    """The process's resident memory in bytes (0 where /proc cannot tell)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class PeakMemory:
    """Context manager: ``peak_bytes`` is the most memory the block used above where it started.

    On CUDA this is torch.cuda.max_memory_allocated; on the CPU the process's resident set is sampled
    every millisecond from /proc (``method`` says which).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self.method = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_sampled"
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
            self.peak_bytes = max(0, self._peak - self._start)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a moment (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def allocation_peak(fn, device: torch.device) -> tuple[int, str]:
    """Peak bytes of tensors ``fn()`` holds at once, and how that was measured.

    CUDA: the allocator's peak above the starting point. CPU: the running sum of the sizes torch's
    profiler records for every allocation and free, in order, at its highest (resident-set sampling
    misses a short inference whose buffers the allocator reuses).
    """
    if device.type == "cuda":
        with PeakMemory(device) as mem:
            fn()
        return mem.peak_bytes, mem.method
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the CUDA build's profiler logs its start to fd 2 on a CPU-only machine
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return int(peak), "cpu_profiler_allocations"
