"""The drift canary (benchmarks/machine/canary.py): a fixed workload that leaves the run's random
stream alone, and whose median is taken as a detection's is."""

from __future__ import annotations

import pytest
import torch
from rcnn_bench.benchmarks.machine import canary as canary_module
from rcnn_bench.benchmarks.machine.canary import Canary

CPU = torch.device("cpu")


def test_the_canary_leaves_the_global_stream_and_is_the_same_workload_every_time():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    first = Canary(CPU)
    assert torch.equal(torch.rand(4), expected)  # building it drew nothing from the run's stream
    second = Canary(CPU)
    assert torch.equal(first.run(), second.run())
    assert first.run().shape == (1, 21)
    # its weights come from its own seeded generator: the first conv's first weight by hand
    gen = torch.Generator().manual_seed(0)
    w = torch.randn((32, 3, 3, 3), generator=gen) * 0.05
    assert torch.equal(first.net[0].weight, w)


def test_time_ms_is_the_median_of_the_repeats(monkeypatch):
    took = iter([0.005, 0.001, 0.003])

    class Clock:
        def __init__(self, device):
            self.out = []

        def __enter__(self):
            return self.out

        def __exit__(self, *exc):
            self.out.append(next(took))

    monkeypatch.setattr(canary_module, "device_clock", Clock)
    assert Canary(CPU).time_ms(3) == pytest.approx(3.0)
