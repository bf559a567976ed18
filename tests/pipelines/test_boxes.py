from __future__ import annotations

import pytest
import torch
from rcnn_bench.pipelines.parts.boxes import (
    box_iou,
    boxes_to_rois,
    clip_boxes,
    decode_deltas,
    dedup_rois,
    encode_deltas,
    flip_boxes,
    min_side_keep,
    unique_boxes,
)
from torch.testing import assert_close
from torchvision.ops import roi_pool


def test_iou_hand_computed():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    assert_close(box_iou(a, b), torch.tensor([[50 / 150, 1.0, 0.0]]))


def test_iou_empty_sides():
    assert box_iou(torch.zeros((0, 4)), torch.rand(3, 4)).shape == (0, 3)
    assert box_iou(torch.rand(2, 4), torch.zeros((0, 4))).shape == (2, 0)


def test_encode_hand_computed():
    p = torch.tensor([[0.0, 0, 10, 20]])
    g = torch.tensor([[5.0, 0, 25, 20]])  # centre moves 10 px (one width), width doubles
    d = encode_deltas(p, g)
    assert_close(d, torch.tensor([[1.0, 0.0, float(torch.log(torch.tensor(2.0))), 0.0]]))
    assert_close(encode_deltas(p, g, (0.1, 0.1, 0.2, 0.2)), d / torch.tensor([0.1, 0.1, 0.2, 0.2]))


@pytest.mark.parametrize("stds", [(1, 1, 1, 1), (0.1, 0.1, 0.2, 0.2)])
def test_encode_decode_round_trip(stds):
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=gen) * 100
    p = torch.cat((xy, xy + 5 + torch.rand(50, 2, generator=gen) * 50), 1)
    xy = torch.rand(50, 2, generator=gen) * 100
    g = torch.cat((xy, xy + 5 + torch.rand(50, 2, generator=gen) * 50), 1)
    assert_close(decode_deltas(p, encode_deltas(p, g, stds), stds), g, atol=1e-4, rtol=1e-5)


def test_decode_per_class_layout():
    p = torch.tensor([[0.0, 0, 10, 10]])
    d = torch.tensor([[0.0, 0, 0, 0, 1.0, 0, 0, 0]])  # class 1: identity, class 2: shift one width
    out = decode_deltas(p, d)
    assert out.shape == (1, 8)
    assert_close(out, torch.tensor([[0.0, 0, 10, 10, 10, 0, 20, 10]]))


def test_clip_min_side_unique_flip_rois():
    b = torch.tensor([[-5.0, 2, 50, 8], [1, 1, 3, 30], [1, 1, 3, 30], [4, 4, 9, 9]])
    assert_close(clip_boxes(b, (20, 40))[0], torch.tensor([0.0, 2, 40, 8]))
    assert min_side_keep(b, 4).tolist() == [True, False, False, True]
    assert unique_boxes(b).tolist() == [0, 1, 3]
    assert unique_boxes(torch.zeros((0, 4))).numel() == 0
    assert_close(flip_boxes(torch.tensor([[2.0, 1, 5, 3]]), 10), torch.tensor([[5.0, 1, 8, 3]]))
    rois = boxes_to_rois([b[:2], b[2:3]])
    assert rois.shape == (3, 5) and rois[:, 0].tolist() == [0, 0, 1]


def test_unique_boxes_matches_a_loop_reference():
    gen = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 6, (8, 4), generator=gen).float()
    boxes = pool[torch.randint(0, 8, (60,), generator=gen)]  # many repeats, in random order
    seen, want = [], []
    for i, box in enumerate(boxes.tolist()):
        if box not in seen:
            seen.append(box)
            want.append(i)
    assert unique_boxes(boxes).tolist() == want


def test_dedup_rois_groups_as_roi_pooling_rounds():
    boxes = torch.tensor(
        [
            [0.0, 0, 32, 32],  # / 16: (0, 0, 2, 2)
            [8, 8, 40, 40],  # (0.5, 0.5, 2.5, 2.5): halves up -> (1, 1, 3, 3)
            [7, 7, 39, 39],  # (0.44, ..., 2.44) -> (0, 0, 2, 2): with the first
            [16, 16, 48, 48],  # (1, 1, 3, 3): with the second (half-to-even would not join them)
            [16, 16, 49, 48],  # (1, 1, 3.06, 3) -> (1, 1, 3, 3): with the second
            [16, 16, 56, 48],  # (1, 1, 3.5, 3) -> (1, 1, 4, 3): alone
        ]
    )
    first, group = dedup_rois(boxes, 1 / 16)
    assert first.tolist() == [0, 1, 5] and group.tolist() == [0, 1, 0, 1, 1, 2]
    assert torch.equal(boxes[first][group][2], boxes[0])
    # Each group pools to the same values: RoI pooling rounds as dedup_rois does.
    pooled = roi_pool(torch.randn(1, 3, 6, 6), boxes_to_rois([boxes]), (2, 2), 1 / 16)
    for k in range(len(boxes)):
        assert torch.equal(pooled[k], pooled[first[group[k]]])
    assert not torch.equal(pooled[5], pooled[1])
    empty_first, empty_group = dedup_rois(torch.zeros((0, 4)), 1 / 16)
    assert empty_first.numel() == 0 and empty_group.numel() == 0
