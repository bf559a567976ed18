"""What a split holds: images, objects per class and per COCO size, and proposal recall.

COCO's size classes go by box area w * h: small below 32^2 pixels, medium below 96^2, large from
96^2 up. Recall counts a non-difficult object as found when some proposal overlaps it with IoU >= 0.5;
difficult objects are counted but not recalled, as evaluation ignores them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from datasets.voc import Annotation

__all__ = ["SIZES", "box_sizes", "describe"]

SIZES = ("small", "medium", "large")


class _Split(Protocol):
    split: str
    classes: tuple[str, ...]
    annotations: list[Annotation]

    def __len__(self) -> int: ...


def box_sizes(boxes: np.ndarray) -> np.ndarray:
    """COCO size class of xyxy boxes (N, 4): int (N,), 0 small, 1 medium, 2 large (index SIZES)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
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


def describe(dataset: _Split, proposals_boxes: list[np.ndarray] | None = None) -> dict:
    """Describe one split.

    Args:
        dataset: a VOCDataset or COCODataset (anything with split, classes, annotations, len).
        proposals_boxes: float (Ri, 4) xyxy proposals per image, in the dataset's order, or None.

    Returns:
        {"split", "images", "objects": {class: {"non_difficult", "difficult"}}, "sizes": {"small",
        "medium", "large": {"non_difficult", "difficult"}}}, and with proposals "recall_iou50":
        {"per_class": {class: float | None}, "per_size": {size: float | None}} over non-difficult
        objects (None where there are none).
    """
    anns = dataset.annotations
    labels = np.concatenate([a.labels for a in anns]).astype(np.int64) - 1
    difficult = np.concatenate([a.difficult for a in anns]).astype(bool)
    sizes = np.concatenate([box_sizes(a.boxes) for a in anns]).astype(np.int64)
    names = list(dataset.classes)
    out = {
        "split": dataset.split,
        "images": len(dataset),
        "objects": _counts(names, labels, difficult),
        "sizes": _counts(list(SIZES), sizes, difficult),
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
