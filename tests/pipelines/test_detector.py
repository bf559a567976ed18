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
