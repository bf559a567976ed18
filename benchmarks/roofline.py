"""How close each pipeline's stages come to the machine's limits.

A short probe measures the device's matrix-multiply rate and memory bandwidth (the roofline's two
ceilings). Each inference stage's FLOPs (torch's FLOP counter: convolutions and matrix products) and
bytes moved (estimated: the sizes of every tensor each operation reads and writes, so cache reuse is not
credited) are counted on one image; with the stage's measured time they give its achieved rate, its
arithmetic intensity and its share of the ceiling that applies to it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from pipelines.timing import StageTimer, synchronize

__all__ = ["CostTimer", "machine_peaks", "stage_efficiency"]


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def machine_peaks(device: torch.device, size: int = 1024, repeats: int = 5) -> dict[str, float]:
    """The device's best measured matrix-multiply rate (float32; bf16 and fp16 too on a GPU), in
    GFLOP/s, and its memory bandwidth (a large copy, bytes read plus written), in GB/s.

    With the thread count already set: on a CPU the rate is that of the threads the run uses.
    """
    out = {}
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [])
    for dtype in dtypes:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        seconds = _best_seconds(lambda a=a, b=b: a @ b, device, repeats)
        out[f"matmul_{str(dtype).split('.')[-1]}_gflops"] = 2 * size**3 / seconds / 1e9
    n = 2**25 if device.type == "cpu" else 2**28  # 128 MiB or 1 GiB of float32: past the caches
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, repeats)
    out["bandwidth_gbs"] = 2 * src.nbytes / seconds / 1e9
    return out


class _Bytes(TorchDispatchMode):
    """Adds up the sizes of the tensors every operation reads and writes."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten((args, kwargs, out))
        self.bytes += sum(t.nbytes for t in flat if isinstance(t, torch.Tensor))
        return out


class CostTimer(StageTimer):
    """A StageTimer that also counts each stage's FLOPs and estimated bytes moved (for one counted
    run, not for timing: counting slows the work)."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__(device)
        self.flops: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with super().stage(name), FlopCounterMode(display=False) as flops, _Bytes() as moved:
            yield
        self.flops[name] = self.flops.get(name, 0) + int(flops.get_total_flops())
        self.bytes[name] = self.bytes.get(name, 0) + moved.bytes


def stage_efficiency(
    flops: dict[str, int], moved: dict[str, int], stages_ms: dict[str, float], peaks: dict
) -> dict[str, dict]:
    """Per stage with FLOPs: FLOPs, bytes, ms (the timed mean), achieved GFLOP/s, intensity
    (FLOP/byte), the roofline's ceiling at that intensity and the achieved share of it."""
    peak, bandwidth = peaks["matmul_float32_gflops"], peaks["bandwidth_gbs"]
    out = {}
    for name, f in flops.items():
        ms = stages_ms.get(name, 0.0)
        if f == 0 or ms <= 0:
            continue
        intensity = f / max(moved.get(name, 0), 1)
        ceiling = min(peak, bandwidth * intensity)
        achieved = f / 1e9 / (ms / 1000)
        out[name] = {
            "flops": f,
            "bytes": moved.get(name, 0),
            "ms": ms,
            "gflops_per_s": achieved,
            "intensity": intensity,
            "ceiling_gflops_per_s": ceiling,
            "share_of_ceiling": achieved / ceiling,
            "share_of_matmul_peak": achieved / peak,
        }
    return out
