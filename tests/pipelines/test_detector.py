from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rcnn_bench.pipelines.context import BuildContext
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.fast_rcnn import FastRCNN
from rcnn_bench.pipelines.parts.backbones import normalize_image
from rcnn_bench.pipelines.parts.detections import Detections
from rcnn_bench.pipelines.parts.scoring import ScoreBudget, candidates, select
from rcnn_bench.pipelines.rcnn import RCNN
from rcnn_bench.pipelines.runtime.timing import StageTimer


def test_select_clips_suppresses_per_class_and_caps():
    boxes = torch.tensor(
        [[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [-5, -5, 30, 30], [20, 20, 25, 25]]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, 1, 2, 2, 2])
    d = select(boxes, scores, labels, (20, 20), nms_iou=0.3, max_per_class=100)
    # Box 1 overlaps box 0 (same class) and goes; box 2 is another class and stays; box 3 is clipped;
    # box 4 lies outside the 20x20 image after clipping (no area) and goes.
    assert d.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert d.labels.tolist() == [1, 2, 2] and d.boxes[2].tolist() == [0, 0, 20, 20]
    capped = select(boxes[:3], scores[:3], torch.tensor([1, 1, 1]), (20, 20), 1.0, max_per_class=2)
    assert capped.scores.tolist() == pytest.approx([0.9, 0.8])


def test_select_empty_and_candidates():
    assert select(
        torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long), (5, 5), 0.3, 10
    ).boxes.shape == (0, 4)
    rows, cls = candidates(torch.tensor([[0.1, 0.9], [0.6, 0.2]]), 0.5)
    assert rows.tolist() == [0, 1] and cls.tolist() == [1, 0]


def test_normalize_image_mean_is_zero():
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    image = mean.round().to(torch.uint8).expand(4, 5, 3).contiguous()
    assert normalize_image(image).abs().max() < 0.01


def _select_reference(boxes, scores, labels, size, nms_iou, max_per_class):
    """A plain loop: clip, drop empty boxes, greedy NMS per class, cap per class, sort by score."""
    h, w = size
    kept = []
    for label in sorted(set(labels.tolist())):
        rows = [i for i in range(len(labels)) if labels[i] == label]
        rows.sort(key=lambda i: -float(scores[i]))
        chosen = []
        for i in rows:
            x1, y1, x2, y2 = boxes[i].tolist()
            b = [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
            if b[2] <= b[0] or b[3] <= b[1]:
                continue
            if all(_iou(b, c) <= nms_iou for _, c in chosen):
                chosen.append((i, b))
        kept += [(float(scores[i]), label, b) for i, b in chosen[:max_per_class]]
    kept.sort(key=lambda t: -t[0])
    return kept


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_matches_a_loop_reference_on_many_classes(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 120
    xy = torch.rand(n, 2, generator=gen) * 50 - 5
    boxes = torch.cat((xy, xy + 3 + torch.rand(n, 2, generator=gen) * 25), dim=1)
    scores = torch.rand(n, generator=gen)  # distinct: the order is well defined
    labels = torch.randint(1, 5, (n,), generator=gen)
    got = select(boxes, scores, labels, (48, 40), nms_iou=0.3, max_per_class=7)
    want = _select_reference(boxes, scores, labels, (48, 40), 0.3, 7)
    assert got.labels.tolist() == [t[1] for t in want]
    torch.testing.assert_close(got.scores, torch.tensor([t[0] for t in want]))
    torch.testing.assert_close(got.boxes, torch.tensor([t[2] for t in want]))


# Per image, the scores of 3 regions for 2 classes (dyadic: exact in float32). With at most 2 candidates
# per class and image and 3 per class over the pass:
#   class 1: image 0 keeps 0.875, 0.625; image 1 keeps 0.8125, 0.75 -> 4 kept, the heap drops 0.625,
#            threshold 0.75; image 2 keeps 0.9375, 0.78125 (0.75 is not above 0.75) -> the heap keeps
#            0.8125, 0.875, 0.9375: final threshold 0.8125.
#   class 2: images 0 and 1 keep 0.125, 0.0625 -> 4 kept, threshold 0.0625; image 2 keeps only 0.125
#            -> the heap keeps 0.125 three times: final threshold 0.125.
PASS_SCORES = [
    torch.tensor([[0.5, 0.125], [0.875, 0.0625], [0.625, 0.03125]]),
    torch.tensor([[0.75, 0.125], [0.25, 0.0625], [0.8125, 0.03125]]),
    torch.tensor([[0.75, 0.125], [0.9375, 0.0625], [0.78125, 0.03125]]),
]
APART = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])  # no NMS between them


def test_score_budget_by_hand():
    budget = ScoreBudget(2, max_per_image=2, max_per_set=3)
    kept = []
    for scores in PASS_SCORES:
        rows, cls = budget.candidates(scores)
        kept.append(sorted(zip(cls.tolist(), scores[rows, cls].tolist(), strict=True)))
    assert kept == [
        [(0, 0.625), (0, 0.875), (1, 0.0625), (1, 0.125)],
        [(0, 0.75), (0, 0.8125), (1, 0.0625), (1, 0.125)],
        [(0, 0.78125), (0, 0.9375), (1, 0.125)],
    ]
    assert budget.thresholds == [0.8125, 0.125]
    silent = ScoreBudget(2, max_per_image=1, max_per_set=None)  # outside a pass: records nothing
    rows, cls = silent.candidates(PASS_SCORES[0])
    assert (
        rows.tolist() == [1, 0] and cls.tolist() == [0, 1] and silent.thresholds == [-math.inf] * 2
    )


def test_score_budget_equals_a_heap_per_class_loop():
    import heapq

    gen = torch.Generator().manual_seed(1)
    k, per_image, per_set = 3, 5, 12
    budget, thresholds = ScoreBudget(k, per_image, per_set), [-math.inf] * k
    heaps, counts = [[] for _ in range(k)], [0] * k
    for r in (7, 2, 9, 4, 8, 3):
        scores = torch.rand(r, k, generator=gen)
        rows, cls = budget.candidates(scores)
        expected = []
        for j in range(k):  # the original's loop: at most per_image above the threshold
            column = sorted(
                (v, i) for i, v in enumerate(scores[:, j].tolist()) if v > thresholds[j]
            )
            chosen = column[::-1][:per_image]
            expected += [(i, j) for _, i in chosen]
            for v, _ in chosen:
                heapq.heappush(heaps[j], v)
            counts[j] += len(chosen)
            if counts[j] > per_set:
                while len(heaps[j]) > per_set:
                    heapq.heappop(heaps[j])
                thresholds[j] = heaps[j][0]
        assert sorted(zip(rows.tolist(), cls.tolist(), strict=True)) == sorted(expected)
        assert budget.thresholds == pytest.approx(thresholds)
    assert all(t > -math.inf for t in thresholds)  # every class's budget filled


@dataclass(frozen=True)
class _BudgetConfig:
    test_topk: str = "adaptive"
    max_per_image: int = 2
    max_per_set_factor: int = 1  # x 3 images: 3 per class


class _Scripted(Detector):
    """Scores region r of image i as PASS_SCORES[i][r] (the image tensor holds i)."""

    name = "scripted"
    config_class = _BudgetConfig

    def fit(self, data, timer):
        return {}

    def paper_schedule(self, stages_s):
        return {}

    def _detect(self, image, proposals, timer, variant):
        scores = PASS_SCORES[int(image)]
        budget = self.test_budget()
        rows, cls = candidates(scores, -1.0) if budget is None else budget.candidates(scores)
        return select(proposals[rows], scores[rows, cls], cls + 1, (60, 60), 0.3, 100)


def _scripted(cfg: _BudgetConfig, keeps_ties: bool) -> _Scripted:
    det = _Scripted(cfg, BuildContext(2, torch.device("cpu"), lambda: None, Path(".")))
    det.keeps_threshold_ties = keeps_ties
    return det


@pytest.mark.parametrize(
    "pipeline, image1",
    [(RCNN, [0.8125, 0.125]), (FastRCNN, [])],  # R-CNN keeps scores equal to the final threshold
)
def test_a_pass_prunes_to_the_final_thresholds(pipeline, image1):
    det = _scripted(_BudgetConfig(), pipeline.keeps_threshold_ties)
    timer = StageTimer("cpu")
    det.start_pass(3)
    dets = [det.detect(torch.tensor(0), APART, timer)]
    state = det.pass_state()
    det.detect(torch.tensor(1), APART, timer)
    det.restore_pass_state(state)  # a repeated image counts once
    dets += [det.detect(torch.tensor(i), APART, timer) for i in (1, 2)]
    assert dets[0].scores.tolist() == [0.875, 0.625, 0.125, 0.0625]  # pruned at the end
    final = det.finish_pass(dets)
    ties = [0.125] if pipeline.keeps_threshold_ties else []
    assert [d.scores.tolist() for d in final] == [[0.875, *ties], image1, [0.9375, *ties]]
    assert det.pass_state() is None  # the pass is over


def test_outside_a_pass_and_in_fixed_mode_nothing_is_recorded():
    det = _scripted(_BudgetConfig(), keeps_ties=False)
    for i in range(3):  # no pass: each image is a pass's first (2 per class, no threshold)
        d = det.detect(torch.tensor(i), APART, StageTimer("cpu"))
        assert len(d.scores) == 4 and det.pass_state() is None
    fixed = _scripted(_BudgetConfig(test_topk="fixed"), keeps_ties=False)
    fixed.start_pass(3)
    dets = [fixed.detect(torch.tensor(i), APART, StageTimer("cpu")) for i in range(3)]
    assert [len(d.scores) for d in dets] == [6, 6, 6]  # every pair above -1
    assert fixed.finish_pass(dets) is dets and fixed.test_budget() is None


def test_each_variant_of_a_pass_has_its_own_budget():
    """A pass of two variants: each one's budget counts its own images only; repeats restore both,
    shares of processes merge per variant, and each variant's detections are pruned by its own."""
    det = _scripted(_BudgetConfig(), keeps_ties=False)
    alone = _scripted(_BudgetConfig(), keeps_ties=False)
    alone.start_pass(3)
    expected = alone.finish_pass(
        [alone.detect(torch.tensor(i), APART, StageTimer("cpu")) for i in range(3)]
    )
    det.start_pass(3, (None, "b"))
    first = det.detect(torch.tensor(0), APART, StageTimer("cpu"))
    state = det.pass_state()
    assert set(state) == {None, "b"} and state["b"].thresholds == [-math.inf] * 2
    det.restore_pass_state(state)
    det.join_pass_states([det.pass_state()])  # one process: its own state
    dets = [first] + [det.detect(torch.tensor(i), APART, StageTimer("cpu")) for i in (1, 2)]
    with pytest.raises(ValueError, match="does not run variant 'c'"):
        det.test_budget("c")
    after = det.pass_state()
    assert after[None].thresholds != after["b"].thresholds == [-math.inf] * 2  # b ran no image
    final = det.finish_pass(dets)
    for a, b in zip(final, expected, strict=True):
        assert torch.equal(a.scores, b.scores)
    assert det.pass_state() is not None  # "b" has not finished
    assert det.finish_pass([Detections.empty()] * 3, "b")[0].scores.numel() == 0
    assert det.pass_state() is None
