"""Checks a run makes before its first expensive step, so that it fails in the first second with one
line naming the file or key, not after an hour of training; and the clean-up of what a killed run left.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from benchmarks.config import RunConfig
from benchmarks.data import Splits, log
from pipelines import distributed
from pipelines.backbones import Backbone
from pipelines.detector import Detector

__all__ = ["check_disk", "check_output", "check_splits", "clean_leftovers", "pid_alive"]


def check_output(cfg: RunConfig) -> None:
    """The output and cache folders exist (or can be made) and take a file."""
    for key, folder in (("output_dir", cfg.output_dir), ("cache_dir", cfg.cache_dir)):
        path = Path(folder)
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
    for cls in classes:
        block = cfg.pipelines[cls.name]
        copies = distributed.local_world_size()  # under torchrun each process keeps its own
        need[cls.name] = copies * cls.cache_bytes(block, n_train, regions, backbone)
    free = shutil.disk_usage(cfg.cache_dir).free
    total = sum(need.values())
    if total > free:
        biggest = max(need, key=need.get)
        hint = (
            "lower proposals.max_proposals"
            if biggest == "proposals"
            else f"see pipelines.{biggest}'s settings (e.g. a feature strategy that keeps less)"
        )
        raise ValueError(
            f"cache_dir: {cfg.cache_dir} has {free / 2**30:.1f} GiB free, the run needs up to "
            f"{total / 2**30:.1f} GiB ({biggest}: {need[biggest] / 2**30:.1f} GiB); {hint}"
        )
    return {**need, "free": free}


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(cfg: RunConfig) -> None:
    """Remove what a killed run left: half-written run folders and training caches whose owner
    process (the number in the name) no longer exists. Finished caches are kept."""
    leftovers = [
        *Path(cfg.output_dir).glob(".*.tmp-*"),
        *Path(cfg.cache_dir).glob("*-work-*"),
    ]
    for path in leftovers:
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            log(f"removing {path}: left by a run that was killed")
            shutil.rmtree(path, ignore_errors=True)
