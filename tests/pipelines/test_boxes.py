from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from pipelines.boxes import (
    box_iou,
    boxes_to_rois,
    clip_boxes,
    decode_deltas,
    encode_deltas,
    flip_boxes,
    min_side_keep,
    unique_boxes,
)


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
