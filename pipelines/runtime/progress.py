"""The one progress bar every long step uses: tqdm with a rate and an ETA on a terminal, silent when
output is not a terminal (a log file, CI), and not drawn at all for a step shorter than a second."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

__all__ = ["log", "progress"]

T = TypeVar("T")


def progress(
    items: Iterable[T], desc: str, unit: str = "it", total: int | None = None
) -> Iterator[T] | tqdm:
    """``items`` wrapped in a progress bar labelled ``desc``.

    Returns:
        The tqdm object (iterate it; ``set_postfix`` shows a running figure such as the loss).
    """
    return tqdm(
        items,
        desc=desc,
        unit=unit,
        total=total,
        disable=None,
        delay=1.0,
        mininterval=1.0,
        dynamic_ncols=True,
    )


def log(message: str) -> None:
    """One line of the run's console account, flushed at once (a log file follows the run)."""
    print(f"[rcnn-bench] {message}", flush=True)
