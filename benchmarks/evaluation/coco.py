"""COCO detection metrics through pycocotools' COCOeval, beside the suite's own VOC metrics.

Ground truth is built in memory from the annotations (difficult objects become crowd objects, which
COCOeval ignores as VOC ignores difficult ones; area as COCO defines it: a COCO file's own, else the
box's w * h), detections go through COCO.loadRes. COCOeval interpolates precision at 101 recall points
(0, 0.01, ..., 1) where VOC2010+ integrates the whole curve, so per-class AP50 here and VOCEvaluator's
"area" AP differ by up to about 0.01 when both rank the same detections.

The COCO protocol scores at most 100 detections per image, over all classes: the evaluation server
keeps an image's 100 highest-scored results, and COCOeval's summary reads AP at the cap 100 (its
params.maxDets [1, 10, 100]). A pipeline that returns more per image (the VOC budget of the originals
allows 100 per class) is cut to its 100 highest-scored detections here, as the server would; the VOC
metrics still see all of them.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rcnn_bench.datasets.coco import coco_json
from rcnn_bench.datasets.voc import Annotation
from rcnn_bench.pipelines.parts.detections import Detections

__all__ = ["MAX_DETS", "coco_ground_truth", "coco_metrics", "per_class_ap", "run_cocoeval", "top_k"]

MAX_DETS = 100  # detections per image the COCO protocol scores


def coco_ground_truth(annotations: list[Annotation], classes: tuple[str, ...] | list[str]) -> COCO:
    """An in-memory COCO index of the annotations: image ids 1..N in list order, category ids = labels."""
    coco = COCO()
    coco.dataset = coco_json(annotations, tuple(classes))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def top_k(det: Detections, k: int = MAX_DETS) -> Detections:
    """The ``k`` highest-scored detections of one image, over all classes (ties: the earlier first)."""
    if len(det.scores) <= k:
        return det
    keep = torch.sort(det.scores, descending=True, stable=True).indices[:k]
    return Detections(det.boxes[keep], det.scores[keep], det.labels[keep])


def _results(gt: COCO, detections: list[Detections], num_classes: int) -> COCO:
    """Detections as a COCO results index (image i of the list is COCO image i + 1)."""
    rows = []
    for number, det in enumerate(map(top_k, detections), start=1):
        for (x1, y1, x2, y2), score, label in zip(
            det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True
        ):
            if not 1 <= label <= num_classes:
                raise ValueError(f"detection label {label} outside 1..{num_classes}")
            rows.append(
                {
                    "image_id": number,
                    "category_id": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    if rows:
        return gt.loadRes(rows)
    empty = COCO()  # loadRes cannot take an empty list
    empty.dataset = {
        "images": gt.dataset["images"],
        "categories": gt.dataset["categories"],
        "annotations": [],
    }
    empty.createIndex()
    return empty


def run_cocoeval(
    annotations: list[Annotation],
    detections: list[Detections],
    classes: tuple[str, ...] | list[str],
) -> COCOeval:
    """Evaluate, accumulate and summarize COCO box AP by the COCO protocol, silently.

    Args:
        annotations: ground truth, one per image.
        detections: one per image, in the same order; labels 1..K. Only each image's MAX_DETS
            highest-scored detections are scored.
        classes: the K class names.

    Returns:
        The COCOeval (its default params: caps 1, 10, 100), with ``eval["precision"]`` (T=10 IoUs,
        R=101 recalls, K, A=4 areas, M=3 caps) and ``stats`` filled in.
    """
    if len(annotations) != len(detections):
        raise ValueError(f"{len(detections)} detection sets for {len(annotations)} images")
    gt = coco_ground_truth(annotations, classes)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, _results(gt, detections, len(classes)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _mean_defined(values: np.ndarray) -> float | None:
    """Mean of the entries COCOeval filled in (-1 marks none), or None when there are none."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None


def per_class_ap(evaluator: COCOeval, iou: float | None = 0.5) -> list[float | None]:
    """Per-class AP from an accumulated COCOeval, with COCO's 101-point interpolation.

    Args:
        evaluator: after accumulate().
        iou: the IoU threshold (one of params.iouThrs), or None for the mean over 0.5:0.95.

    Returns:
        AP of label k + 1 at index k, over all areas at the cap of 100; None for a class
        with no non-crowd ground truth.
    """
    params = evaluator.params
    precision = evaluator.eval["precision"][:, :, :, params.areaRngLbl.index("all"), -1]
    if iou is not None:
        precision = precision[[int(np.argmin(np.abs(params.iouThrs - iou)))]]
    return [_mean_defined(precision[:, :, k]) for k in range(precision.shape[2])]


def coco_metrics(
    annotations: list[Annotation],
    detections: list[Detections],
    classes: tuple[str, ...] | list[str],
) -> dict:
    """COCO's box metrics.

    Args:
        annotations, detections, classes: as run_cocoeval.

    Returns:
        {"ap": AP@[.5:.95], "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "per_class":
        {name: {"ap", "ap50"}}}; None where COCOeval has no value (-1: no ground truth there).
    """
    evaluator = run_cocoeval(annotations, detections, classes)
    keys = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    out: dict = {
        k: (float(v) if v > -1 else None) for k, v in zip(keys, evaluator.stats, strict=False)
    }
    ap, ap50 = per_class_ap(evaluator, None), per_class_ap(evaluator, 0.5)
    out["per_class"] = {name: {"ap": ap[k], "ap50": ap50[k]} for k, name in enumerate(classes)}
    return out
