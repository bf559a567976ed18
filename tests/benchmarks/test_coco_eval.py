from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rcnn_bench.benchmarks.evaluation.coco import (
    coco_ground_truth,
    coco_metrics,
    per_class_ap,
    run_cocoeval,
)
from rcnn_bench.benchmarks.evaluation.voc import VOCEvaluator, voc07_ap
from rcnn_bench.datasets.synthetic import SYNTHETIC_CLASSES
from rcnn_bench.datasets.voc import Annotation
from rcnn_bench.pipelines.parts.detections import Detections


def ann(boxes, labels, difficult=None, size=(200, 200)):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = list(labels)
    difficult = difficult if difficult is not None else [False] * len(labels)
    return Annotation("x", size, boxes, np.asarray(labels, np.int64), np.asarray(difficult, bool))


def dets(boxes, scores, labels):
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.long),
    )


# --- the VOC 11-point rule against the devkit's own loop -----------------------------------------


def devkit_voc07(recall, precision):
    """VOCevaldet.m: ap = sum over t = 0:0.1:1 of max(prec(rec >= t)) / 11 (0 where none).

    MATLAB builds 0:0.1:1 symmetrically: the first half as 0 + k * 0.1, the second as 1 - (10 - k) *
    0.1, so t = 0.3 is 0.30000000000000004 but t = 0.6 and 0.7 are exactly the doubles 0.6 and 0.7.
    """
    ap = 0.0
    for k in range(11):
        t = k * 0.1 if k <= 5 else 1 - (10 - k) * 0.1
        above = [p for r, p in zip(recall, precision, strict=True) if r >= t]
        ap += (max(above) if above else 0.0) / 11
    return ap


def pr_curve(hits, npos):
    """(recall, precision) of a ranked list of hits (1 true positive, 0 false positive)."""
    tp = np.cumsum(hits)
    fp = np.cumsum(1 - np.asarray(hits))
    return tp / npos, tp / (tp + fp)


def test_voc07_matches_the_devkit_rule_on_a_hand_case():
    # 4 objects; ranked TP, FP, TP, TP, FP: recall .25 .25 .5 .75 .75, precision 1 .5 .667 .75 .6.
    recall, precision = pr_curve([1, 0, 1, 1, 0], npos=4)
    # t = 0, .1, .2: best precision 1; t = .3 ... .7: best at recall >= t is .75 (at recall .75);
    # t = .8, .9, 1: recall never gets there, 0.
    assert devkit_voc07(recall, precision) == pytest.approx((3 * 1 + 5 * 0.75) / 11)
    assert voc07_ap(recall, precision) == pytest.approx((3 * 1 + 5 * 0.75) / 11)


def test_voc07_matches_the_devkit_at_a_recall_of_exactly_six_tenths():
    # 5 objects; TP, TP, TP, FP, TP: recall .2 .4 .6 .6 .8, precision 1 1 1 .75 .8.
    recall, precision = pr_curve([1, 1, 1, 0, 1], npos=5)
    # devkit: t = 0 ... .6 (seven points) best precision 1; t = .7, .8: .8; t = .9, 1: 0.
    assert devkit_voc07(recall, precision) == pytest.approx((7 * 1 + 2 * 0.8) / 11)
    assert voc07_ap(recall, precision) == pytest.approx((7 * 1 + 2 * 0.8) / 11)


# --- COCOeval on hand-built cases ---------------------------------------------------------------


def test_hand_case_over_iou_thresholds_and_sizes():
    gt = [
        ann([[0, 0, 100, 100], [100, 100, 200, 200]], [1, 1]),
        ann(
            [[10, 10, 60, 60]], [1], difficult=[True]
        ),  # crowd for COCO: its hit counts neither way
    ]
    detections = [
        # an exact hit, and a hit of IoU 6200 / 10000 = 0.62 on the other object
        dets([[0, 0, 100, 100], [100, 100, 200, 162]], [0.9, 0.8], [1, 1]),
        dets([[10, 10, 60, 60]], [0.95], [1]),
    ]
    m = coco_metrics(gt, detections, ("a", "b"))
    # IoU thresholds .5, .55, .6: both objects found, AP 1. From .65 to .95 (seven thresholds) recall
    # stops at 0.5 with precision 1: 101-point AP counts recall points 0, .01, ..., .5, that is 51/101.
    assert m["ap50"] == pytest.approx(1.0)
    assert m["ap75"] == pytest.approx(51 / 101)
    assert m["ap"] == pytest.approx((3 + 7 * 51 / 101) / 10)
    # Both objects are large (100 x 100 >= 96^2): small and medium have no ground truth.
    assert m["ap_large"] == pytest.approx(m["ap"])
    assert m["ap_small"] is None and m["ap_medium"] is None
    assert m["per_class"]["a"] == pytest.approx({"ap": m["ap"], "ap50": 1.0})
    assert m["per_class"]["b"] == {"ap": None, "ap50": None}  # no ground truth


def test_no_detections_is_ap_zero_and_prints_nothing(capsys):
    gt = [ann([[0, 0, 50, 50]], [2])]
    m = coco_metrics(gt, [Detections.empty()], ("a", "b"))
    assert m["ap"] == 0.0 and m["ap50"] == 0.0
    assert m["per_class"] == {"a": {"ap": None, "ap50": None}, "b": {"ap": 0.0, "ap50": 0.0}}
    assert capsys.readouterr().out == ""


def test_arguments_are_checked():
    gt = [ann([[0, 0, 50, 50]], [1])]
    with pytest.raises(ValueError, match=r"detection label 3 outside 1\.\.2"):
        coco_metrics(gt, [dets([[0, 0, 5, 5]], [0.5], [3])], ("a", "b"))
    with pytest.raises(ValueError, match="2 detection sets for 1 images"):
        coco_metrics(gt, [Detections.empty()] * 2, ("a", "b"))


def test_a_coco_files_own_areas_set_the_size_classes():
    # A 100 x 100 box (large by w * h) whose file gives it a segmentation area of 500: small for COCO.
    gt = [
        Annotation(
            "x",
            (200, 200),
            np.array([[0, 0, 100, 100]], np.float32),
            np.array([1]),
            np.array([False]),
            areas=np.array([500.0]),
        )
    ]
    m = coco_metrics(gt, [dets([[0, 0, 100, 100]], [0.9], [1])], ("a",))
    assert m["ap_small"] == pytest.approx(1.0)
    assert m["ap_medium"] is None and m["ap_large"] is None


# --- more than 100 detections per image: the COCO protocol's cap -------------------------------


def pycocotools_summary(annotations, detections, classes):
    """pycocotools' own summary of the COCO protocol, built with plain dicts and loops: the ground
    truth as a COCO file holds it, each image's 100 highest-scored detections, default params."""
    images, objects, results = [], [], []
    for number, (a, d) in enumerate(zip(annotations, detections, strict=True), start=1):
        images.append({"id": number, "height": a.size[0], "width": a.size[1]})
        for box, label, crowd in zip(
            a.boxes.tolist(), a.labels.tolist(), a.difficult.tolist(), strict=True
        ):
            w, h = box[2] - box[0], box[3] - box[1]
            objects.append(
                {
                    "id": len(objects) + 1,
                    "image_id": number,
                    "category_id": label,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
        rows = sorted(
            zip(d.scores.tolist(), d.boxes.tolist(), d.labels.tolist(), strict=True),
            key=lambda r: -r[0],
        )
        for score, (x1, y1, x2, y2), label in rows[:100]:
            results.append(
                {
                    "image_id": number,
                    "category_id": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": objects,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(classes)],
    }
    gt.createIndex()
    evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def many_detections(annotations, per_image, seed=1):
    """Per image ``per_image`` detections: a jittered hit on each object at a random score, the rest
    random boxes of random classes, some scored above the hits (so that the cap drops hits)."""
    rng = np.random.default_rng(seed)
    out = []
    for a in annotations:
        h, w = a.size
        boxes, scores, labels = [], [], []
        for box, label in zip(a.boxes, a.labels, strict=True):
            side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            boxes.append((box + rng.normal(0, 0.05, 4) * side).tolist())
            scores.append(float(rng.uniform(0.3, 1.0)))
            labels.append(int(label))
        while len(boxes) < per_image:
            x1, y1 = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
            boxes.append([x1, y1, min(w, x1 + rng.uniform(5, 60)), min(h, y1 + rng.uniform(5, 60))])
            scores.append(float(rng.uniform(0.0, 0.9)))
            labels.append(int(rng.integers(1, 5)))
        out.append(dets(boxes, scores, labels))
    return out


def test_more_than_100_detections_per_image_are_scored_as_pycocotools(capsys):
    rng = np.random.default_rng(0)
    annotations = []
    for _ in range(3):  # 3 images of 12 objects of 4 classes, one of them crowd
        xy = rng.uniform(0, 400, (12, 2))
        wh = rng.uniform(8, 200, (12, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, 600)], axis=1)
        difficult = np.arange(12) == 5
        annotations.append(ann(boxes, rng.integers(1, 5, 12), difficult.tolist(), (600, 600)))
    detections = many_detections(annotations, per_image=250)
    classes = ("a", "b", "c", "d")
    m = coco_metrics(annotations, detections, classes)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = pycocotools_summary(annotations, detections, classes)
    capsys.readouterr()
    keys = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    assert None not in [m[k] for k in keys]  # objects of every size: every figure defined
    assert [m[k] for k in keys] == pytest.approx([float(v) for v in reference[:6]], abs=1e-12)
    assert 0.05 < m["ap"] < 0.95  # neither trivial bound
    # The cap changed something: every detection scored (what a raised maxDets did) finds more hits.
    assert ap50_of_every_detection(annotations, detections, classes) > m["ap50"] + 0.01


def ap50_of_every_detection(annotations, detections, classes):
    """AP50 with no per-image cap (maxDets raised past the detections' count), read from COCOeval's
    precision array, since its summary would look for the cap 100 and print -1."""
    gt = coco_ground_truth(annotations, classes)
    rows = [
        {"image_id": i, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
        for i, d in enumerate(detections, start=1)
        for (x1, y1, x2, y2), s, c in zip(
            d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), strict=True
        )
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(rows), iouType="bbox")
        evaluator.params.maxDets = [1, 10, 1000]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][0, :, :, 0, -1]
    return float(precision[precision > -1].mean())


# --- the suite's own metric against COCOeval on detections like the suite's ---------------------


def _iou(box, boxes):
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    return inter / (area + np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) - inter), inter / area


def _rules_agree(box, gt_boxes, gt_difficult):
    """True when VOC's and COCO's matching rules must treat this detection alike.

    VOC matches a detection to its highest-IoU object and ignores it when that object is difficult;
    COCO matches it to the highest-IoU object not yet taken, preferring non-crowd ones, and measures a
    crowd object's overlap as intersection over the detection's own area. Both agree when at most one
    object is within reach (overlap >= 0.5 by each one's own measure) and no difficult object is in
    reach by one measure and not by the other.
    """
    if len(gt_boxes) == 0:
        return True
    iou, covered = _iou(box, gt_boxes)
    reach = np.where(gt_difficult, covered, iou) >= 0.5
    return reach.sum() <= 1 and not np.any(gt_difficult & ((iou >= 0.5) != (covered >= 0.5)))


def suite_like_detections(annotations, seed=0):
    """Per object a jittered hit (sometimes a second, lower-scored one), plus background false
    positives of random classes; scores random. Detections where the two rules could part are left
    out (see _rules_agree). Returns (detections, number left out)."""
    rng = np.random.default_rng(seed)
    out, dropped = [], 0
    for a in annotations:
        h, w = a.size
        rows = []
        for box, label in zip(a.boxes, a.labels, strict=True):
            side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            for copy in range(1 + int(rng.uniform() < 0.3)):
                jittered = box + rng.normal(0, 0.12, 4) * side
                rows.append((jittered, rng.uniform(0.2, 1.0) * (0.6 if copy else 1.0), label))
        for _ in range(3):
            x1, y1 = rng.uniform(0, w - 12), rng.uniform(0, h - 12)
            box = np.array(
                [x1, y1, min(w, x1 + rng.uniform(8, 40)), min(h, y1 + rng.uniform(8, 40))]
            )
            rows.append((box, rng.uniform(0.0, 0.9), int(rng.integers(1, 5))))
        kept = []
        for box, score, label in rows:
            same = a.labels == label
            if _rules_agree(box, a.boxes[same].astype(np.float64), a.difficult[same]):
                kept.append((box, score, label))
        dropped += len(rows) - len(kept)
        kept.sort(key=lambda row: -row[1])
        out.append(dets([k[0].tolist() for k in kept], [k[1] for k in kept], [k[2] for k in kept]))
    return out, dropped


def test_suite_area_ap_agrees_with_coco_ap50_on_suite_like_detections(tiny_voc):
    _, written = tiny_voc
    annotations = written["trainval"] + written["test"]
    detections, dropped = suite_like_detections(annotations)
    # Left out so that the rules agree: two detections inside difficult objects (IoU 0.25 and 0.45,
    # a VOC false positive; over half their area inside, so COCO ignores them) and one within reach of
    # two objects. Kept in, they would put disc at 0.68 (VOC area) against 0.81 (COCO).
    assert dropped == 3
    voc = VOCEvaluator(SYNTHETIC_CLASSES)
    for a, d in zip(annotations, detections, strict=True):
        voc.process(a, d)
    voc_result = voc.evaluate()
    assert max(len(d.scores) for d in detections) <= 100  # COCO scores all of them, as VOC does
    evaluator = run_cocoeval(annotations, detections, SYNTHETIC_CLASSES)
    coco_ap50 = per_class_ap(evaluator, 0.5)
    compared = 0
    for k, name in enumerate(SYNTHETIC_CLASSES):
        area = voc_result["per_class"][name]["area"]
        if voc_result["per_class"][name]["num_gt"] == 0:  # no non-difficult object: no AP in either
            assert area is None and coco_ap50[k] is None
            continue
        compared += 1
        # COCO samples the monotone PR curve at 101 recall points where the area metric integrates
        # it; on the suite's own PR curve, COCO's sampling gives COCO's number exactly.
        recall = np.asarray(voc_result["pr"][name]["recall"])
        precision = np.asarray(voc_result["pr"][name]["precision"])
        sampled = np.mean([precision[recall >= r].max(initial=0) for r in evaluator.params.recThrs])
        assert coco_ap50[k] == pytest.approx(sampled, abs=1e-12)
        assert coco_ap50[k] == pytest.approx(area, abs=0.02)
        assert area < 0.99  # false positives and misses make the comparison mean something
    assert compared == 4


def test_perfect_detections_are_ap_one_in_both(tiny_voc):
    _, written = tiny_voc
    annotations = written["trainval"] + written["test"]
    perfect = [
        dets(a.boxes.tolist(), np.linspace(1, 0.5, len(a.boxes)).tolist(), a.labels.tolist())
        for a in annotations
    ]
    voc = VOCEvaluator(SYNTHETIC_CLASSES)
    for a, d in zip(annotations, perfect, strict=True):
        voc.process(a, d)
    result = voc.evaluate()
    assert result["voc07"] == pytest.approx(1.0) and result["area"] == pytest.approx(1.0)
    m = coco_metrics(annotations, perfect, SYNTHETIC_CLASSES)
    assert m["ap"] == pytest.approx(1.0) and m["ap50"] == pytest.approx(1.0)
    assert m["ap75"] == pytest.approx(1.0)
    assert m["ap_large"] is None  # images are at most 80 x 96 = 7680 < 96^2 pixels
    assert all(v == pytest.approx({"ap": 1.0, "ap50": 1.0}) for v in m["per_class"].values())
