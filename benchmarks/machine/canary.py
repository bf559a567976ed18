"""The drift canary: a fixed workload timed beside every timed test image, so that a change in the
machine's own speed between two runs can be told from a change in the code.

On a 2-core VM the four pipelines' median latencies move together from one process to the next by
5-10% (one run in four on CI's VM by 23-30%), the size of a real slowdown of every pipeline; the
paired speedups cancel such a common move, and with it a real common slowdown. The canary runs the
kinds of kernels the pipelines spend their time in (3x3 convolutions, max pooling, matrix products),
in the same process, with the same threads and the same arithmetic, between their detections; its
weights and input are built here, from a fixed seed, and nothing of the suite's own code runs in it,
so a change to a pipeline cannot change it. The relative gate divides every pipeline's time by it
(``latency[pipelines/canary]``).
"""

from __future__ import annotations

import torch
from rcnn_bench.pipelines.runtime.timing import arithmetic, device_clock
from torch import nn

__all__ = ["Canary"]


class Canary:
    """A small convolutional network of fixed weights on a fixed input (about 0.1 GFLOP)."""

    def __init__(self, device: torch.device, precision: str = "fp32"):
        gen = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):  # layer construction draws: leave the run's stream
            self.net = self._layers()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        self.net.to(device).eval()
        self.input = torch.randn((1, 3, 96, 96), generator=gen).to(device)
        self.device, self.precision = device, precision
        self.samples_ms: list[float] = []  # what a timing pass measured (harness.inference)

    @staticmethod
    def _layers() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(6),
            nn.Flatten(),
            nn.Linear(64 * 6 * 6, 512),
            nn.ReLU(),
            nn.Linear(512, 21),
        )

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        """The workload once (its output: a 1 x 21 tensor)."""
        return self.net(self.input)

    def time_ms(self, repeats: int = 1) -> float:
        """The median wall time of ``repeats`` runs, in ms, timed as a detection is."""
        took: list[float] = []
        for _ in range(max(1, repeats)):
            with arithmetic(self.device, self.precision), device_clock(self.device) as t:
                self.run()
            took.append(t[0] * 1000)
        return sorted(took)[(len(took) - 1) // 2]
