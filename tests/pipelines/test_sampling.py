from __future__ import annotations

import torch

from pipelines.sampling import match, sample_fg_bg, with_ground_truth


def test_match_labels_and_empty_ground_truth():
    props = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60]])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    m = match(props, gt, torch.tensor([3]), 0.5)
    assert m.labels.tolist() == [3, 3, 0]
    assert m.iou.tolist() == [1.0, 0.5, 0.0]
    empty = match(props, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.labels.tolist() == [0, 0, 0] and empty.iou.tolist() == [0, 0, 0]


def test_rcnn_32_96_sampler():
    gen = torch.Generator().manual_seed(0)
    iou = torch.cat((torch.full((100,), 0.7), torch.full((400,), 0.2), torch.full((50,), 0.0)))
    fg, bg = sample_fg_bg(iou, 128, 0.25, 0.5, (0.0, 0.5), gen)
    assert len(fg) == 32 and len(bg) == 96
    assert (iou[fg] >= 0.5).all() and (iou[bg] < 0.5).all()
    assert len(set(fg.tolist())) == 32 and len(set(bg.tolist())) == 96


def test_fast_rcnn_band_and_shortfall():
    gen = torch.Generator().manual_seed(0)
    iou = torch.tensor([0.9, 0.55, 0.3, 0.12, 0.05, 0.0, 0.49, 0.1])
    fg, bg = sample_fg_bg(iou, 64, 0.25, 0.5, (0.1, 0.5), gen)
    assert sorted(fg.tolist()) == [0, 1]  # only two foreground exist
    assert sorted(bg.tolist()) == [2, 3, 6, 7]  # [0.1, 0.5): 0.05 and 0.0 are out
    fg, bg = sample_fg_bg(torch.full((200,), 0.8), 64, 0.25, 0.5, (0.1, 0.5), gen)
    assert len(fg) == 16 and len(bg) == 0


def test_ground_truth_goes_first():
    out = with_ground_truth(torch.ones(2, 4), torch.zeros(1, 4))
    assert out[0].tolist() == [0, 0, 0, 0] and out.shape == (3, 4)
