"""The environment a result was measured in (docs/design.md: recorded with every result)."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision

from benchmarks.memory import allocator_setting

__all__ = ["cpu_model", "environment", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """ "auto" -> CUDA when present, else CPU; anything else is passed to torch.device.

    Raises:
        ValueError: CUDA was asked for and is not available, or the name is not a device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device name") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def make_reproducible(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed Python's, NumPy's and torch's global generators and, with ``deterministic``, make torch
    pick deterministic kernels.

    On the CPU an op without a deterministic kernel is an error. On CUDA this also sets
    CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS reproducibility needs it, before the first cuBLAS call),
    turns off cuDNN's benchmark autotuner and asks cuDNN for deterministic algorithms: PyTorch's
    "Reproducibility" notes. There an op without a deterministic kernel only warns, because
    torchvision's RoI pooling backward accumulates with atomics and has none: CUDA inference is
    reproducible, CUDA training of the pipelines that pool RoIs is not bit-exact. Same config, same
    seed, same machine and thread count on a CPU: the same losses, detections and APs.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global stream a library may draw from)
    torch.manual_seed(seed)
    if not deterministic:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")


@contextmanager
def seeded(seed: int, name: str) -> Iterator[None]:
    """Run a block with torch's global generators seeded from ``seed`` and ``name`` and restored
    afterwards, so a pipeline's random draws (layer initialisation, dropout) depend on neither the
    order the pipelines run in nor which other pipelines run."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + zlib.crc32(name.encode()))
        yield


def machine_load(window_s: float = 0.5) -> dict[str, float | None]:
    """How busy the machine is: the 1-minute load average, and the share of the machine's CPU time
    that processes other than this one used over ``window_s`` (None where /proc is not there)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        before = _cpu_ticks()
        time.sleep(window_s)
        after = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return {"load_1min": load, "other_cpu_share": None}
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    return {"load_1min": load, "other_cpu_share": max(0.0, (busy - own) / max(total, 1.0))}


def _cpu_ticks() -> tuple[float, float, float]:
    """(busy ticks of all CPUs, all ticks of all CPUs, ticks of this process) from /proc."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(fields) - idle, sum(fields), float(stat[11]) + float(stat[12])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment(device: torch.device) -> dict:
    """Device name, library versions, CPU, threads and commit."""
    cuda = device.type == "cuda"
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "allocator": allocator_setting(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "dirty": dirty,
    }
