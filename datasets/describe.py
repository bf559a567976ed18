"""What a split holds: images, objects per class and per COCO size, and proposal recall.

COCO's size classes go by the objects' areas as COCO defines them (a COCO file's own ``area``,
else the box's w * h): small below 32^2 pixels, medium below 96^2, large from 96^2 up. Recall counts
a non-difficult object as found when some proposal overlaps it with IoU >= 0.5; difficult objects are
counted but not recalled, as evaluation ignores them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
from rcnn_bench.datasets.voc import Annotation

__all__ = ["DEGENERATE_EXAMPLES", "SIZES", "describe", "size_classes"]

DEGENERATE_EXAMPLES = 5  # degenerate boxes named by image id and class, in the split's order

SIZES = ("small", "medium", "large")


class _Split(Protocol):
    split: str
    classes: tuple[str, ...]
    annotations: list[Annotation]

    def __len__(self) -> int: ...


def size_classes(area: np.ndarray) -> np.ndarray:
    """COCO size class of areas (N,): int (N,), 0 small, 1 medium, 2 large (index SIZES)."""
    return np.searchsorted(np.array([32.0**2, 96.0**2]), area, side="right")


def _best_iou(gt: np.ndarray, proposals: np.ndarray) -> np.ndarray:
    """(G,) the highest IoU of each xyxy box in ``gt`` with any of ``proposals`` (0 with none)."""
    if len(gt) == 0 or len(proposals) == 0:
        return np.zeros(len(gt))
    lt = np.maximum(gt[:, None, :2], proposals[None, :, :2])
    rb = np.minimum(gt[:, None, 2:], proposals[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_gt = np.prod(gt[:, 2:] - gt[:, :2], axis=1)
    area_p = np.prod(proposals[:, 2:] - proposals[:, :2], axis=1)
    return (inter / (area_gt[:, None] + area_p[None, :] - inter)).max(axis=1)


def _counts(names: list[str], keys: np.ndarray, difficult: np.ndarray) -> dict:
    return {
        name: {
            "non_difficult": int(((keys == k) & ~difficult).sum()),
            "difficult": int(((keys == k) & difficult).sum()),
        }
        for k, name in enumerate(names)
    }


def _recall(names: list[str], keys: np.ndarray, found: np.ndarray) -> dict[str, float | None]:
    """Share of found objects per key (None where a key has no object)."""
    return {
        name: float(found[keys == k].mean()) if (keys == k).any() else None
        for k, name in enumerate(names)
    }


def _degenerate(dataset: _Split, names: list[str]) -> dict:
    """Boxes at most one pixel wide or tall: how many per class, and the first few by name."""
    per_class = dict.fromkeys(names, 0)
    examples = []
    for a in dataset.annotations:
        wh = a.boxes[:, 2:] - a.boxes[:, :2]
        for k in np.flatnonzero((wh <= 1).any(axis=1)):
            name = names[int(a.labels[k]) - 1]
            per_class[name] += 1
            if len(examples) < DEGENERATE_EXAMPLES:
                examples.append(f"{a.image_id}: {name} {wh[k, 0]:g}x{wh[k, 1]:g}")
    return {"count": sum(per_class.values()), "per_class": per_class, "examples": examples}


def _below(
    anns: list[Annotation], names: list[str], keys: np.ndarray, keep: np.ndarray, floor: Callable
) -> dict[str, float | None]:
    """Per class, the share of kept objects whose side (sqrt of the box's area) is below
    ``floor((H, W))`` of their image (None where a class has no kept object)."""
    sides = np.concatenate(
        [np.sqrt(np.prod(a.boxes[:, 2:].astype(np.float64) - a.boxes[:, :2], axis=1)) for a in anns]
    )
    limits = np.concatenate([np.full(len(a.boxes), floor(a.size), np.float64) for a in anns])
    return _recall(names, keys[keep], (sides < limits)[keep])


def describe(
    dataset: _Split,
    proposals_boxes: list[np.ndarray] | None = None,
    floors: dict[str, tuple[str, str | None, Callable[[tuple[int, int]], float]]] | None = None,
) -> dict:
    """Describe one split.

    Args:
        dataset: a VOCDataset or COCODataset (anything with split, classes, annotations, len).
        proposals_boxes: float (Ri, 4) xyxy proposals per image, in the dataset's order, or None.
        floors: per pipeline, (what its unit of view is, the config key that moves it or None, and
            (H, W) -> the side in that image's pixels of an object one unit across).

    Returns:
        {"split", "images", "objects": {class: {"non_difficult", "difficult"}}, "sizes": {"small",
        "medium", "large": {"non_difficult", "difficult"}}, "degenerate": {"count", "per_class":
        {class: int}, "examples": ["<image id>: <class> <w>x<h>", ...]}}; with proposals
        "recall_iou50": {"per_class": {class: float | None}, "per_size": {size: float | None}} over
        non-difficult objects (None where there are none); with floors "below_floor": {pipeline:
        {"unit", "knob", "per_class": {class: share of non-difficult objects below it | None}}}.
    """
    anns = dataset.annotations
    labels = np.concatenate([a.labels for a in anns]).astype(np.int64) - 1
    difficult = np.concatenate([a.difficult for a in anns]).astype(bool)
    sizes = np.concatenate([size_classes(a.coco_areas) for a in anns]).astype(np.int64)
    names = list(dataset.classes)
    out = {
        "split": dataset.split,
        "images": len(dataset),
        "objects": _counts(names, labels, difficult),
        "sizes": _counts(list(SIZES), sizes, difficult),
        "degenerate": _degenerate(dataset, names),
    }
    if floors:
        out["below_floor"] = {
            name: {
                "unit": unit,
                "knob": knob,
                "per_class": _below(anns, names, labels, ~difficult, side),
            }
            for name, (unit, knob, side) in floors.items()
        }
    if proposals_boxes is None:
        return out
    if len(proposals_boxes) != len(anns):
        raise ValueError(f"{len(proposals_boxes)} proposal sets for {len(anns)} images")
    best = np.concatenate(
        [
            _best_iou(a.boxes, np.asarray(p, np.float64))
            for a, p in zip(anns, proposals_boxes, strict=True)
        ]
    )
    keep = ~difficult
    found = best[keep] >= 0.5
    out["recall_iou50"] = {
        "per_class": _recall(names, labels[keep], found),
        "per_size": _recall(list(SIZES), sizes[keep], found),
    }
    return out
