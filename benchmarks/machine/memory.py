"""Peak memory of a block of work: CUDA's allocator peak, or sampled resident memory on the CPU; and
the C allocator's settings, which CPU times depend on."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "PeakMemory",
    "allocation_peak",
    "allocator_setting",
    "pin_allocator",
    "rss_bytes",
    "trim_heap",
]

_PAGE = 4096

# glibc's malloc by default adapts where it gets memory from to what the process freed before: a block
# above its mmap threshold (128 KiB at first) is mapped on its own and unmapped when freed, the threshold
# then rising to that block's size, and free memory at the heap's top goes back to the system past a
# trim threshold that follows it. A CPU run's speed therefore depended on what the process had done
# before: R-CNN's training on the CI config took 43 s in a run that read the pre-trained weights from
# the cache and 31 s in one that had just pre-trained them (its blocks of warped regions were mapped,
# faulted in page by page and unmapped again on each iteration), the test pass the same 15 s in both
# (benchmarks/NOTES.md, 2026-11-26). Fixed thresholds, set once at start-up, make every run's
# allocations take the same path whatever ran before; each measured block starts from a trimmed heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's own upper bound for the adaptive threshold (64-bit)
TRIM_THRESHOLD = 1 << 30  # free heap top kept for reuse; trim_heap gives it back between blocks
_pinned: str | None = None  # what pin_allocator did, once it has run


@functools.cache
def _libc():
    """The process's C library when it is glibc (mallopt and malloc_trim are glibc's), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def pin_allocator() -> str:
    """Fix glibc malloc's mmap and trim thresholds for the rest of the process (see above); what
    results.json records as ``env.allocator``."""
    global _pinned
    libc = _libc()
    if libc is None:
        _pinned = "system default (not glibc: thresholds left as they are)"
    elif libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(
        _M_TRIM_THRESHOLD, TRIM_THRESHOLD
    ):
        _pinned = (
            f"glibc malloc, mmap threshold {MMAP_THRESHOLD >> 20} MiB and trim threshold "
            f"{TRIM_THRESHOLD >> 20} MiB fixed; heap trimmed before each measured block"
        )
    else:
        _pinned = "glibc malloc, adaptive (mallopt refused the fixed thresholds)"
    return _pinned


def allocator_setting() -> str:
    """What pin_allocator did in this process, or that it has not run."""
    return _pinned or "system default (not pinned)"


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere), so
    that a block of work starts from the same allocator state whatever ran before it."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_bytes() -> int:
    """The process's resident memory in bytes (0 where /proc cannot tell)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class PeakMemory:
    """Context manager: ``peak_bytes`` is the most memory the block used above where it started.

    On CUDA this is torch.cuda.max_memory_allocated; on the CPU the process's resident set is sampled
    every millisecond from /proc (``method`` says which), after the C heap's free memory has been given
    back (trim_heap), so that neither the peak nor the block's speed depends on what ran before it.
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
            trim_heap()
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
