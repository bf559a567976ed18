"""The environment a result was measured in (docs/design.md: recorded with every result)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import subprocess
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision
from rcnn_bench.benchmarks.config import RunConfig
from rcnn_bench.benchmarks.machine.memory import allocator_setting, pin_allocator
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.progress import log

__all__ = ["LoadSampler", "cpu_model", "environment", "fingerprint", "resolve_device", "setup"]


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


def setup(cfg: RunConfig) -> torch.device:
    """Thread count, the C allocator's thresholds, device, seeds, deterministic kernels, and the
    training's arithmetic (IEEE float32 unless ``train_tf32``; each test-time pass sets its own)."""
    pin_allocator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.init_from_env(resolve_device(cfg.device))
    make_reproducible(cfg.seed, cfg.deterministic, device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = cfg.train_tf32
    if distributed.world_size() > 1:
        log(f"process {distributed.rank()} of {distributed.world_size()} on {device}")
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


class LoadSampler:
    """How busy the machine is while a block runs: a background thread reads /proc/stat every
    ``interval_s`` and keeps, per interval, the share of all CPUs' time that other processes used
    (busy time less this process's own) and, apart from it, the share the hypervisor stole (VM
    steal: another guest on the host, not a process here). Use as ``with LoadSampler() as s:``;
    ``s.summary()`` afterwards. Where /proc is not there it samples nothing (summary's shares None).
    """

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.other: list[float] = []
        self.steal: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="load-sampler", daemon=True)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            before = _cpu_ticks()
            while not self._stop.wait(self.interval_s):
                after = _cpu_ticks()
                self._add(before, after)
                before = after
            self._add(before, _cpu_ticks())
        except (OSError, ValueError, IndexError):
            return

    def _add(self, before: tuple, after: tuple) -> None:
        busy, total, own, steal = (a - b for a, b in zip(after, before, strict=True))
        if total > 0:
            self.other.append(max(0.0, (busy - own) / total))
            self.steal.append(steal / total)

    def summary(self) -> dict:
        """{"samples", "other_cpu_share", "steal_share" (each {"mean", "max"}, None without /proc),
        "load_1min" (at the end)}."""

        def stats(values: list[float]) -> dict | None:
            return {"mean": float(np.mean(values)), "max": max(values)} if values else None

        return {
            "samples": len(self.other),
            "interval_s": self.interval_s,
            "other_cpu_share": stats(self.other),
            "steal_share": stats(self.steal),
            "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }


def _cpu_ticks() -> tuple[float, float, float, float]:
    """(busy ticks of all CPUs, all ticks, ticks of this process, ticks stolen by the hypervisor)
    from /proc. /proc/stat's cpu line: user nice system idle iowait irq softirq steal (guest time
    is counted in user already)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    fields += [0.0] * (8 - len(fields))
    idle, steal = fields[3] + fields[4], fields[7]
    stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(fields)
    return total - idle - steal, total, float(stat[11]) + float(stat[12]), steal


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def fingerprint(device: torch.device) -> dict:
    """What makes a timing or an accuracy a fact about one machine: the CPU (model, instruction-set
    flags, cores), torch's threads, torch's build (version, BLAS, the CPU kernels it dispatches to)
    and the device. Two results with equal ``id`` come from machines alike in all of these; a
    committed baseline of another id gates nothing absolute (benchmarks/gate/compare.py)."""
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    print_ = {
        "cpu": cpu_model(),
        "cpu_flags_sha1": hashlib.sha1(" ".join(_cpu_flags()).encode()).hexdigest()[:12],
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "blas": blas.group(1) if blas else None,
        "cpu_capability": capability,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    digest = hashlib.sha1(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:12]
    return {"id": digest, **print_}


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
        "fingerprint": fingerprint(device),
    }
