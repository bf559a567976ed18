from __future__ import annotations

import torch

from benchmarks.memory import PeakMemory, allocation_peak


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
