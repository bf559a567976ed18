"""The stage timer both pipelines and the harness use.

On CUDA the device is synchronized before a stage starts and before it ends, so that a stage's time is
the work it queued, not the time to queue it (docs/design.md, "Timing rules").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["StageTimer", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Accumulates wall time per named stage.

    Args:
        device: where the timed work runs; CUDA devices are synchronized around every stage.

    Example:
        timer = StageTimer(device)
        with timer.stage("cnn"):
            features = net(x)
        timer.seconds  # {"cnn": 0.012}
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, other: StageTimer, prefix: str) -> None:
        """Add ``other``'s stage times to this timer's, each stage named "<prefix>/<stage>"."""
        for name, seconds in other.seconds.items():
            key = f"{prefix}/{name}"
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds
