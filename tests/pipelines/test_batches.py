from __future__ import annotations

import numpy as np
import pytest
import torch
from rcnn_bench.datasets.voc import Annotation
from rcnn_bench.pipelines.parts.batches import draw_image, images_in_band, training_regions
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.parts.sampling import Matches


def test_training_regions_put_the_ground_truth_first_and_match_at_fg_iou():
    # One image, one object of class 3 at (0, 0, 10, 10); proposals at IoU 81/100 = 0.81 (a
    # 9-pixel-wide copy) and 0 (far away).
    boxes = np.array([[0.0, 0, 10, 10]], np.float32)
    ann = Annotation("a", (40, 40), boxes, np.array([3]), np.array([False]))
    props = np.array([[0.0, 0, 9, 9], [20, 20, 30, 30]], np.float32)
    data = TrainData([np.zeros((40, 40, 3), np.uint8)], [ann], [props], 3)
    rois, gts, matches = training_regions(data, 0.5)
    assert torch.equal(rois[0], torch.tensor([[0.0, 0, 10, 10], [0, 0, 9, 9], [20, 20, 30, 30]]))
    assert torch.equal(gts[0][0], torch.tensor([[0.0, 0, 10, 10]])) and gts[0][1].tolist() == [3]
    assert matches[0].labels.tolist() == [3, 3, 0]
    assert matches[0].iou.tolist() == pytest.approx([1.0, 0.81, 0.0])
    assert training_regions(data, 0.9)[2][0].labels.tolist() == [3, 0, 0]  # 0.81 < 0.9


def test_images_in_band_drop_images_without_a_foreground_or_background_roi():
    def matches(*ious):
        iou = torch.tensor(ious)
        return Matches(iou, torch.zeros(len(ious), dtype=torch.long), (iou >= 0.5).long())

    # Image 0: one foreground RoI; image 1: only IoU 0.05, below the band [0.1, 0.5); image 2: 0.3.
    band = [matches(0.7, 0.0), matches(0.05), matches(0.3)]
    assert images_in_band(band, 0.5, (0.1, 0.5), "x") == [0, 2]
    with pytest.raises(ValueError, match="x: no training image has a foreground or background RoI"):
        images_in_band([matches(0.05)], 0.5, (0.1, 0.5), "x")


def test_draw_image_takes_each_entry_once_per_epoch():
    gen, order, pool = torch.Generator().manual_seed(0), [], [0, 1, 4, 5]
    epochs = [sorted(draw_image(order, pool, gen) for _ in pool) for _ in range(3)]
    assert epochs == [pool] * 3
