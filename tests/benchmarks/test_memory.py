from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rcnn_bench.benchmarks.machine.memory import PeakMemory, allocation_peak, pin_allocator


def test_cpu_allocation_peak_sees_a_short_lived_buffer():
    def work():
        a = torch.ones(1024, 1024)  # 4 MiB, freed before the next one
        del a
        b = torch.ones(512, 1024)  # 2 MiB
        return b.sum()

    peak, method = allocation_peak(work, torch.device("cpu"))
    assert method == "cpu_profiler_allocations"
    assert 4 * 2**20 <= peak < 7 * 2**20  # the two buffers never coexist


def test_rss_sampling_sees_a_large_held_buffer():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64, 1024, 1024)  # 256 MiB, touched
        x += 1
        del x
    assert mem.peak_bytes > 200 * 2**20 and mem.method == "cpu_rss_sampled"


# A block of work that allocates 64 MiB in 1 MiB tensors, touches them and frees them all, nine times
# over. With glibc's adaptive thresholds the freed 64 MiB is past the trim threshold; when it lies at
# the heap's top it is given back each time and the next round faults every page in again: measured on
# this machine, 147177 of the 9 x 64 MiB / 4 KiB = 147456 pages in some fresh processes, 1536 or 16610
# in others, as the heap's layout fell (which is the trouble). Pinned, the heap keeps it and every
# process reuses it; then trim_heap gives the kept 64 MiB back. Each run is a fresh process (the
# thresholds are process-wide); two pinned runs, as one unpinned process may happen to be lucky.
_ALLOCATOR_SCRIPT = """
import resource, sys, torch
from rcnn_bench.benchmarks.machine.memory import pin_allocator, rss_bytes, trim_heap
if sys.argv[1] == "pinned":
    pin_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def work():
    blocks = [torch.ones(256, 1024) for _ in range(64)]
    del blocks
work()
before = faults()
for _ in range(9):
    work()
held = rss_bytes()
trim_heap()
print(faults() - before, held - rss_bytes())
"""


def _allocator_run(mode: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR_SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and malloc_trim are glibc's")
def test_pinned_allocator_reuses_the_heap_and_trim_gives_it_back():
    pages = 9 * 64 * 2**20 // 4096
    for _ in range(2):
        pinned_faults, given_back = _allocator_run("pinned")
        assert pinned_faults < 0.05 * pages  # the rounds reuse the heap
        assert given_back > 48 * 2**20  # trim_heap returned the kept 64 MiB (less what else held)
    assert "mmap threshold 32 MiB" in pin_allocator()
