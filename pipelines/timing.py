"""The stage timer both pipelines and the harness use, and the test-time precision they run at.

On CUDA the device is synchronized before a stage starts, and the stage's time is read from CUDA events
recorded around it (the work it queued, measured on the device, not the time to queue it); on the CPU
it is wall time (docs/design.md, "Timing rules").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["AUTOCAST_DTYPES", "StageTimer", "autocast", "device_clock", "synchronize"]

# bench.precision -> the dtype torch.autocast runs matrix products and convolutions in (None: float32).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a test-time pass runs in: nothing for "fp32", else torch.autocast in the
    precision's dtype (convolutions and matrix products in 16 bits, reductions and box arithmetic
    in float32, as autocast's op lists decide).

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(
            f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}"
        )
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextmanager
def device_clock(device: torch.device) -> Iterator[list[float]]:
    """Time a block in seconds, appended to the yielded list when it ends.

    The device is synchronized first, so that earlier work is not counted. On CUDA the time is that
    between two CUDA events recorded around the block; elsewhere it is perf_counter's.
    """
    out: list[float] = []
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield out
        finally:
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        return
    begin = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - begin)


class StageTimer:
    """Accumulates time per named stage (device_clock's: CUDA events on a GPU, wall time on a CPU).

    Args:
        device: where the timed work runs.

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
        with device_clock(self.device) as took:
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + took[0]

    def add(self, other: StageTimer, prefix: str) -> None:
        """Add ``other``'s stage times to this timer's, each stage named "<prefix>/<stage>"."""
        for name, seconds in other.seconds.items():
            key = f"{prefix}/{name}"
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds
