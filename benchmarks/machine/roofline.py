"""How close each pipeline's stages come to the machine's limits.

A short probe measures the device's matrix-multiply rate and memory bandwidth (the roofline's two
ceilings). Each inference stage's FLOPs (torch's FLOP counter: convolutions and matrix products) and
bytes moved (estimated: the sizes of every tensor each operation reads and writes, so cache reuse is not
credited) are counted on one image; with the stage's measured time they give its achieved rate, its
arithmetic intensity and its share of the ceiling that applies to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from rcnn_bench.pipelines.runtime.timing import StageTimer, device_clock, tf32_allowed
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "CostTimer",
    "machine_peaks",
    "reference_gflops",
    "stage_efficiency",
    "with_reference",
]


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        with device_clock(device) as took:
            fn()
        best = min(best, took[0])
    return best


def machine_peaks(device: torch.device, repeats: int = 5) -> dict[str, float]:
    """The device's best measured matrix-multiply rate in GFLOP/s (float32; on a GPU also TF32,
    bf16 and fp16, square products of 8192, large enough to reach the tensor cores' rate), and its
    memory bandwidth (a large copy, bytes read plus written), in GB/s.

    With the thread count already set: on a CPU the rate is that of the threads the run uses. On a GPU
    "float32" is IEEE float32 (TF32 off for the probe) and "tf32" the rate with TF32 tensor cores.
    """
    out = {}
    cuda = device.type == "cuda"
    size = 8192 if cuda else 1024
    kinds = [("float32", torch.float32, False)]
    if cuda:
        kinds += [("tf32", torch.float32, True), ("bfloat16", torch.bfloat16, False)]
        kinds += [("float16", torch.float16, False)]
    for label, dtype, tf32 in kinds:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        with tf32_allowed(tf32):
            seconds = _best_seconds(lambda a=a, b=b: a @ b, device, repeats)
        out[f"matmul_{label}_gflops"] = 2 * size**3 / seconds / 1e9
    n = 2**25 if device.type == "cpu" else 2**28  # 128 MiB or 1 GiB of float32: past the caches
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, repeats)
    out["bandwidth_gbs"] = 2 * src.nbytes / seconds / 1e9
    return out


def with_reference(peaks: dict, precision: str) -> dict:
    """``peaks`` plus the rate each stage's share is taken of: "compute_kind" and "compute_gflops".

    That is the matrix-multiply rate in the precision the timed passes run in (``bench.precision``,
    pipelines.timing.arithmetic): float32 at fp32, and on a GPU TF32, bf16 and fp16 their own; on a
    CPU, whose other rates are not probed, float32 for all.
    """
    kind = {"fp32": "float32", "tf32": "tf32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    if f"matmul_{kind}_gflops" not in peaks:
        kind = "float32"
    return {**peaks, "compute_kind": kind, "compute_gflops": peaks[f"matmul_{kind}_gflops"]}


def reference_gflops(peaks: dict) -> float:
    """The rate a stage's share is taken of (results before with_reference: float32's)."""
    return peaks.get("compute_gflops", peaks["matmul_float32_gflops"])


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
    peak, bandwidth = reference_gflops(peaks), peaks["bandwidth_gbs"]
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
