"""Several processes under torchrun: who this process is, its share of a batch or of a list, and the
collectives the pipelines and the harness use (torch.distributed; gloo on the CPU, NCCL on CUDA).

Without torchrun (no WORLD_SIZE in the environment) nothing is initialised, the world is one process,
every share is the whole and every gather is the process's own object: the default path runs no
collective. Every collective here is called by every process in the same order (the pipelines and the
harness run the same code on each rank).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "check_split",
    "finish",
    "gather",
    "in_rounds",
    "init_from_env",
    "is_main",
    "local_world_size",
    "main_first",
    "rank",
    "share",
    "sum_over_ranks",
    "world_size",
]

T = TypeVar("T")


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).

    Args:
        device: the device the config resolved to.

    Returns:
        This process's device: on CUDA, GPU LOCAL_RANK of this machine (NCCL); otherwise ``device``
        (gloo). Unchanged, and nothing initialised, without torchrun or with one process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def finish() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size() -> int:
    """The processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the process that writes caches first, the run folder and the report."""
    return rank() == 0


def check_split(batch: int, key: str) -> None:
    """A batch of ``batch`` items splits evenly over the processes.

    Raises:
        ValueError: it does not; the message names the config ``key``.
    """
    n = world_size()
    if batch % n:
        raise ValueError(
            f"{key}: a batch of {batch} does not split evenly over {n} processes; run a world "
            f"size that divides it (the effective batch stays {batch} at any world size)"
        )


def share(n: int) -> range:
    """This process's items of a batch or list of ``n``: every world_size-th from its rank on, so
    that the processes' shares are disjoint and together are range(n)."""
    return range(rank(), n, world_size())


def gather(obj: T) -> list[T]:
    """Every process's ``obj`` (picklable; tensors on the CPU), in rank order, on every process."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over the processes (a copy; ``value`` itself unchanged)."""
    total = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total)
    return total


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the others once it is done: what rank 0 computes and caches (the
    synthetic data, the proposals), the others read."""
    if is_main():
        out = fn()
    if world_size() > 1:
        dist.barrier()
    if not is_main():
        out = fn()
    return out


def in_rounds(fn: Callable[[int], T], n: int) -> Callable[[int], T]:
    """``fn`` over items 0..n-1 shared between the processes: items are taken in rounds of
    world_size consecutive ones; the first call for an item of a new round has each process compute
    its item of that round and gathers the round on every process.

    Every process must call the returned function with the same items in the same order (each call
    of an item outside the current round is one collective). ``fn`` returns what ``gather`` takes
    (tensors on the CPU).
    """
    if world_size() == 1:
        return fn
    cached: dict[int, T] = {}

    def call(i: int) -> T:
        if i not in cached:
            start = i - i % world_size()
            mine = start + rank()
            results = gather(fn(mine) if mine < n else None)
            cached.clear()
            cached.update({start + r: v for r, v in enumerate(results) if start + r < n})
        return cached[i]

    return call
