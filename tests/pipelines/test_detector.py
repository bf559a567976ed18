from __future__ import annotations

import pytest
import torch

from pipelines.detector import candidates, normalize_image, select


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
