"""The smallest object a pipeline resolves: what the data section measures each class against.

A shared-map pipeline sees an object through the cells of its conv map, each ``stride`` pixels of the
resized image; an object smaller than one cell is a fraction of one feature vector. R-CNN warps every
region to its network's input, so a small object is enlarged, never lost: its floor is informative
only and names no knob.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ObjectFloor", "conv_cell_floor", "scale_factor"]


@dataclass(frozen=True)
class ObjectFloor:
    """The object size below which a pipeline sees an object through less than one unit of its view.

    Attributes:
        unit: what that unit is ("one 16-pixel conv-map cell at scale 288 (longer side <= 480)").
        knob: the config key that moves the floor, or None where an object under it is not lost
            (R-CNN enlarges a small region to its warp: the report gives the share, nothing warns).
        side: (H, W) of an image -> the side, in that image's pixels, of an object (sqrt of its
            box's area) at the floor.
    """

    unit: str
    knob: str | None
    side: Callable[[tuple[int, int]], float]


def scale_factor(size: tuple[int, int], scale: int, max_size: int) -> float:
    """The factor a shared-map pipeline resizes an image of ``size`` (H, W) by: the shorter side to
    ``scale``, unless the longer would then pass ``max_size``."""
    return min(scale / min(size), max_size / max(size))


def conv_cell_floor(name: str, stride: int, scale: int, max_size: int) -> ObjectFloor:
    """A shared-map pipeline's floor: one conv-map cell, ``stride`` pixels of the resized image, is
    stride / s pixels of the original (s: scale_factor); the knobs are pipelines.<name>.scale and,
    where it caps the factor, max_size."""
    return ObjectFloor(
        unit=f"one {stride}-pixel conv-map cell at scale {scale} (longer side <= {max_size})",
        knob=f"pipelines.{name}.scale (and .max_size)",
        side=lambda size: stride / scale_factor(size, scale, max_size),
    )
