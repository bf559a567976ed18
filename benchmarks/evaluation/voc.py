"""Pascal VOC detection AP: the VOC2007 11-point metric (both papers') and the VOC2010+ area metric.

Per class, detections from all images are ranked by score. A detection is a true positive when its best
ground-truth box of that class (IoU >= 0.5) has not been claimed by a higher-scoring detection; a second
hit on the same object is a false positive. A detection whose best match is a difficult object counts
neither way, and difficult objects are not in the recall denominator. A class with no (non-difficult)
ground truth has no AP and is left out of the mean; a class with ground truth but no detection has AP 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from rcnn_bench.datasets.voc import Annotation
from rcnn_bench.pipelines.parts.boxes import box_iou
from rcnn_bench.pipelines.parts.detections import Detections

__all__ = ["VOCEvaluator", "area_ap", "voc07_ap"]


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """11-point AP: the mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t."""
    ap = 0.0
    # t = k / 10 exactly as the devkit's 0:0.1:1 (linspace gives 0.6000000000000001 for 0.6, and a
    # recall of exactly 3/5 would then miss that point).
    for t in np.arange(11) / 10:
        above = precision[recall >= t]
        ap += (above.max() if above.size else 0.0) / 11
    return float(ap)


def area_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision-recall curve with precision made monotone (VOC2010 onwards)."""
    r = np.concatenate(([0.0], recall, [1.0]))
    p = np.concatenate(([0.0], precision, [0.0]))
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


@dataclass
class _ClassRecords:
    scores: list[float] = field(default_factory=list)
    image: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)


class VOCEvaluator:
    """reset / process / evaluate, as detectron2's evaluators.

    Args:
        classes: class names; labels are index + 1.
        iou: the overlap a true positive needs (0.5).
        strict_iou: a second, stricter overlap also reported (0.7), where box regression shows.
    """

    def __init__(
        self, classes: tuple[str, ...] | list[str], iou: float = 0.5, strict_iou: float = 0.7
    ):
        self.classes = tuple(classes)
        self.iou = iou
        self.strict_iou = strict_iou
        self.reset()

    def reset(self) -> None:
        self._gt: list[Annotation] = []
        self._dets = [_ClassRecords() for _ in self.classes]

    def process(self, annotation: Annotation, detections: Detections) -> None:
        """Add one image: its ground truth and its detections."""
        index = len(self._gt)
        self._gt.append(annotation)
        boxes = detections.boxes.numpy()
        for box, score, label in zip(
            boxes, detections.scores.tolist(), detections.labels.tolist(), strict=True
        ):
            if not 1 <= label <= len(self.classes):
                raise ValueError(f"detection label {label} outside 1..{len(self.classes)}")
            rec = self._dets[label - 1]
            rec.scores.append(score)
            rec.image.append(index)
            rec.boxes.append(box)

    def _pr(self, j: int, iou: float) -> tuple[np.ndarray, np.ndarray, int]:
        label = j + 1
        gt = [(a.boxes[a.labels == label], a.difficult[a.labels == label]) for a in self._gt]
        npos = int(sum((~d).sum() for _, d in gt))
        rec = self._dets[j]
        order = np.argsort(-np.asarray(rec.scores), kind="stable")
        claimed = [np.zeros(len(b), bool) for b, _ in gt]
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        for rank, d in enumerate(order):
            boxes, difficult = gt[rec.image[d]]
            if len(boxes) == 0:
                fp[rank] = 1
                continue
            ious = box_iou(torch.from_numpy(rec.boxes[d][None]), torch.from_numpy(boxes))[0].numpy()
            best = int(ious.argmax())
            if ious[best] < iou:
                fp[rank] = 1
            elif difficult[best]:
                continue
            elif claimed[rec.image[d]][best]:
                fp[rank] = 1
            else:
                tp[rank] = 1
                claimed[rec.image[d]][best] = True
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / max(npos, 1)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        return recall, precision, npos

    def evaluate(self) -> dict:
        """Per-class and mean AP.

        Returns:
            {"voc07": mean 11-point AP, "area": mean area AP, "voc07_strict": mean 11-point AP at
            the stricter ``strict_iou`` (a localisation check), "per_class": {name: {"voc07", "area",
            "voc07_strict", "num_gt", "num_det"}}, "pr": {name: {"recall": [...], "precision":
            [...]}}}; a class without ground truth has None for its APs.
        """
        per_class, pr = {}, {}
        for j, name in enumerate(self.classes):
            recall, precision, npos = self._pr(j, self.iou)
            strict_recall, strict_precision, _ = self._pr(j, self.strict_iou)
            has_gt = npos > 0
            per_class[name] = {
                "voc07": voc07_ap(recall, precision) if has_gt else None,
                "area": area_ap(recall, precision) if has_gt else None,
                "voc07_strict": voc07_ap(strict_recall, strict_precision) if has_gt else None,
                "num_gt": npos,
                "num_det": len(self._dets[j].scores),
            }
            pr[name] = {"recall": recall.tolist(), "precision": precision.tolist()}
        scored = [v for v in per_class.values() if v["voc07"] is not None]
        return {
            key: float(np.mean([v[key] for v in scored])) if scored else 0.0
            for key in ("voc07", "area", "voc07_strict")
        } | {"strict_iou": self.strict_iou, "per_class": per_class, "pr": pr}
