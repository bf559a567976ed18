"""The stage timer the pipelines and the harness use, and the test-time precision they run at.

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

__all__ = [
    "CHANNELS_LAST",
    "PRECISIONS",
    "StageTimer",
    "arithmetic",
    "channels_last_on",
    "device_clock",
    "synchronize",
    "tf32_allowed",
]

# bench.precision -> (the dtype torch.autocast runs matrix products and convolutions in, None for no
# autocast; whether CUDA's float32 convolutions and matrix products may run on TF32 tensor cores).
# PyTorch's own default is neither: TF32 for cuDNN's convolutions, not for matrix products.
PRECISIONS: dict[str, tuple[torch.dtype | None, bool]] = {
    "fp32": (None, False),  # IEEE float32 throughout: the papers' arithmetic (Caffe on a K40)
    "tf32": (None, True),  # float32 tensors, products with a 10-bit mantissa (Ampere and later)
    "bf16": (torch.bfloat16, False),  # what autocast keeps in float32 stays IEEE float32
    "fp16": (torch.float16, False),
}


# bench.channels_last: the networks' memory format, in training and at test time. "auto" takes
# channels-last on the CPU, where oneDNN's convolutions and max pooling run several times faster in it
# (benchmarks/NOTES.md, 2026-12-08: the tiny trunk 4-6x on 2 cores, torch 2.14), and the contiguous
# format elsewhere (CUDA: the papers' path, where channels-last was measured no faster in float32).
CHANNELS_LAST = (True, False, "auto")


def channels_last_on(channels_last: bool | str, device: torch.device) -> bool:
    """Whether the networks run in channels-last memory format: ``channels_last`` itself, or for
    "auto" whether ``device`` is a CPU. The two formats compute the same functions; their kernels
    sum in other orders, so results agree to float rounding, not to the bit."""
    if channels_last not in CHANNELS_LAST:
        raise ValueError(f"channels_last must be true, false or 'auto', got {channels_last!r}")
    return device.type == "cpu" if channels_last == "auto" else bool(channels_last)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """Run a block with CUDA's float32 convolutions (cuDNN) and matrix products (cuBLAS) allowed
    on TF32 tensor cores or not, and the previous settings restored afterwards. The CPU's kernels
    do not read these flags."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def arithmetic(device: torch.device, precision: str) -> Iterator[None]:
    """The arithmetic a test-time pass runs in (``bench.precision``, one of PRECISIONS): float32
    with TF32 off ("fp32") or on ("tf32"), or torch.autocast in 16 bits (convolutions and matrix
    products in bfloat16 or float16, reductions and box arithmetic in float32, as autocast's op
    lists decide).

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype, tf32 = PRECISIONS[precision]
    cast = contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    with tf32_allowed(tf32), cast:
        yield


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
