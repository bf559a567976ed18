"""Checks a run makes before its first expensive step, so that it fails in the first second with one
line naming the file or key, not after an hour of training; and the clean-up of what a killed run left.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rcnn_bench.benchmarks.config import RunConfig
from rcnn_bench.benchmarks.harness.data import Splits
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.parts.backbones import Backbone
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.disk import free_disk
from rcnn_bench.pipelines.runtime.progress import log

__all__ = ["check_disk", "check_output", "check_splits", "clean_leftovers", "pid_alive"]


def check_output(output_dir: str, cache_dir: str, create: bool = True) -> None:
    """The output and cache folders exist (or can be made) and take a file; with ``create`` false
    (a dry run) nothing is made or written: the folder, or its nearest existing parent, must be a
    writable folder."""
    for key, folder in (("output_dir", output_dir), ("cache_dir", cache_dir)):
        path = Path(folder)
        if not create:
            existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
            if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
                raise ValueError(f"{key}: {path} is not a writable folder ({existing} is not)")
            continue
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"{key}: {path} is not a writable folder ({err.strerror})") from None


def check_splits(splits: Splits) -> None:
    """The test split has something to score: at least one object that is not difficult."""
    test = splits.test
    if not any((~ann.difficult).any() for ann in test.annotations):
        raise ValueError(
            f"{splits.root}: test split {test.split!r} has no object that is not difficult, so "
            "there is nothing to score (difficult objects count neither way in VOC's AP)"
        )


def check_disk(
    cfg: RunConfig,
    splits: Splits,
    classes: list[type[Detector]],
    backbone: Backbone,
) -> dict[str, int]:
    """Bytes the caches will need, against the free space of the cache folder.

    Returns:
        {"proposals": bytes, "<pipeline>": bytes of its training caches (one per process on this
        machine under torchrun), "free": bytes free}.

    Raises:
        ValueError: the caches will not fit; the message names the knob that helps.
    """
    n_train = len(splits.train)
    regions = cfg.proposals.max_proposals
    need = {"proposals": (n_train + len(splits.test)) * regions * 4 * 4}
    free = free_disk(Path(cfg.cache_dir))
    for cls in classes:
        block = cfg.pipelines[cls.name]
        copies = distributed.local_world_size()  # under torchrun each process keeps its own
        free_share = free // copies
        need[cls.name] = copies * cls.cache_bytes(block, n_train, regions, backbone, free_share)
    total = sum(need.values())
    if total > free:
        biggest = max(need, key=need.get)
        raise ValueError(
            f"cache_dir: {cfg.cache_dir} has {free / 2**30:.1f} GiB free, the run needs up to "
            f"{total / 2**30:.1f} GiB ({biggest}: {need[biggest] / 2**30:.1f} GiB); "
            f"{_disk_knob(cfg, biggest)}"
        )
    return {**need, "free": free}


def _disk_knob(cfg: RunConfig, biggest: str) -> str:
    """What to change when ``biggest`` (a pipeline's name, or "proposals") does not fit."""
    block = cfg.pipelines.get(biggest)
    if getattr(block, "features", "none") != "none":
        return f"set pipelines.{biggest}.features: none (recompute instead of caching) or lower {_LESS}"
    return f"lower {_LESS}"


_LESS = "proposals.max_proposals or data.train_limit"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(output_dir: str, cache_dir: str) -> None:
    """Remove what a killed run left: half-written run folders (in ``output_dir``) and training
    caches (in ``cache_dir``) whose owner process (the number in the name) no longer exists.
    Finished caches are kept."""
    leftovers = [*Path(output_dir).glob(".*.tmp-*"), *Path(cache_dir).glob("*-work-*")]
    for path in leftovers:
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            log(f"removing {path}: left by a run that was killed")
            shutil.rmtree(path, ignore_errors=True)
