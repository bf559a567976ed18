from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from rcnn_bench.benchmarks.evaluation.voc import VOCEvaluator, area_ap, voc07_ap
from rcnn_bench.datasets.voc import Annotation
from rcnn_bench.pipelines.parts.detections import Detections


def ann(boxes, labels, difficult=None, image_id="x"):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return Annotation(
        image_id,
        (100, 100),
        boxes,
        np.asarray(labels, np.int64),
        np.asarray(difficult if difficult is not None else [False] * len(labels), bool),
    )


def dets(boxes, scores, labels):
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.long),
    )


def test_perfect_detection_is_ap_one():
    ev = VOCEvaluator(["a"])
    ev.process(ann([[10, 10, 50, 50]], [1]), dets([[10, 10, 50, 50]], [0.9], [1]))
    r = ev.evaluate()
    assert r["voc07"] == pytest.approx(1.0) and r["area"] == pytest.approx(1.0)


def test_duplicate_detection_is_a_false_positive():
    ev = VOCEvaluator(["a"])
    ev.process(
        ann([[10, 10, 50, 50]], [1]), dets([[10, 10, 50, 50], [11, 11, 50, 50]], [0.9, 0.8], [1, 1])
    )
    r = ev.evaluate()
    # precision [1, 0.5] at recall [1, 1]: AP is still 1, but the PR curve shows the false positive.
    assert r["pr"]["a"]["precision"] == [1.0, 0.5]
    # Ranked the other way round the duplicate costs precision at full recall.
    ev.reset()
    ev.process(
        ann([[10, 10, 50, 50], [60, 60, 90, 90]], [1, 1]),
        dets([[10, 10, 50, 50], [11, 11, 50, 50], [60, 60, 90, 90]], [0.9, 0.8, 0.7], [1, 1, 1]),
    )
    r = ev.evaluate()
    assert r["pr"]["a"]["recall"] == [0.5, 0.5, 1.0]
    assert r["pr"]["a"]["precision"] == pytest.approx([1.0, 0.5, 2 / 3])
    # 11-point: recall >= t for t <= 0.5 gives 1.0 (6 points), t in 0.6..1.0 gives 2/3 (5 points).
    assert r["voc07"] == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)
    # area: 0.5 * 1.0 + 0.5 * 2/3.
    assert r["area"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_difficult_objects_count_neither_way():
    ev = VOCEvaluator(["a"])
    ev.process(
        ann([[10, 10, 50, 50], [60, 60, 90, 90]], [1, 1], difficult=[False, True]),
        dets([[60, 60, 90, 90], [10, 10, 50, 50]], [0.95, 0.9], [1, 1]),
    )
    r = ev.evaluate()
    assert r["per_class"]["a"]["num_gt"] == 1  # the difficult box is not in the denominator
    assert r["voc07"] == pytest.approx(1.0)  # the hit on it is not a false positive
    assert r["pr"]["a"]["recall"] == [0.0, 1.0]


def test_class_without_detections_and_class_without_ground_truth():
    ev = VOCEvaluator(["a", "b", "c"])
    ev.process(
        ann([[10, 10, 50, 50], [0, 0, 20, 20]], [1, 2]),
        dets([[10, 10, 50, 50], [30, 30, 60, 60]], [0.9, 0.5], [1, 3]),
    )
    r = ev.evaluate()
    assert r["per_class"]["b"]["voc07"] == 0.0  # ground truth, no detection
    assert r["per_class"]["c"]["voc07"] is None  # no ground truth: no AP, not in the mean
    assert r["voc07"] == pytest.approx(0.5)


def test_eleven_point_differs_from_area():
    recall = np.array([0.1, 0.2, 0.2, 0.45])
    precision = np.array([1.0, 1.0, 0.67, 0.8])
    # 11-point: t = 0 .. 0.2 -> 1.0 (3 points), t = 0.3, 0.4 -> 0.8 (2 points), t >= 0.5 -> 0.
    assert voc07_ap(recall, precision) == pytest.approx((3 * 1.0 + 2 * 0.8) / 11)
    # area: 0.2 * 1.0 + 0.25 * 0.8.
    assert area_ap(recall, precision) == pytest.approx(0.2 + 0.25 * 0.8)


def test_low_iou_is_false_positive_and_bad_label():
    ev = VOCEvaluator(["a"])
    ev.process(ann([[0, 0, 10, 10]], [1]), dets([[5, 5, 15, 15]], [0.9], [1]))  # IoU 25/175
    assert ev.evaluate()["voc07"] == 0.0
    with pytest.raises(ValueError, match=re.escape("label 2 outside 1..1")):
        ev.process(ann([[0, 0, 10, 10]], [1]), dets([[0, 0, 10, 10]], [0.9], [2]))


def test_strict_iou_counts_a_loose_box_only_at_the_lower_threshold():
    ev = VOCEvaluator(["a"], iou=0.5, strict_iou=0.7)
    ev.process(ann([[0, 0, 10, 10]], [1]), dets([[0, 0, 10, 6]], [0.9], [1]))  # IoU 0.6
    r = ev.evaluate()
    assert r["voc07"] == pytest.approx(1.0) and r["voc07_strict"] == 0.0 and r["strict_iou"] == 0.7
