from __future__ import annotations

import itertools

import torch
from rcnn_bench.pipelines.parts.sampling import (
    RegionIndex,
    match,
    sample_fg_bg,
    sample_without_replacement,
    with_ground_truth,
)


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


def test_floyd_draws_every_subset_equally_often(monkeypatch):
    # 3 of 5: the draws t in [0, 2], [0, 3], [0, 4] (3 x 4 x 5 = 60 equally likely triples) must give
    # each of the C(5, 3) = 10 subsets 6 times.
    counts: dict[tuple[int, ...], int] = {}
    for t in itertools.product(range(3), range(4), range(5)):
        u = torch.tensor([(tk + 0.5) / (j + 1) for tk, j in zip(t, (2, 3, 4), strict=True)])
        monkeypatch.setattr(torch, "rand", lambda n, generator, u=u: u[:n])
        subset = tuple(sorted(sample_without_replacement(5, 3, None).tolist()))
        counts[subset] = counts.get(subset, 0) + 1
    assert sorted(counts) == list(itertools.combinations(range(5), 3))
    assert set(counts.values()) == {6}


def test_floyd_shortfall_and_empty():
    gen = torch.Generator().manual_seed(0)
    assert sorted(sample_without_replacement(4, 10, gen).tolist()) == [0, 1, 2, 3]
    assert sample_without_replacement(0, 5, gen).tolist() == []


def _walk_every_region(iou, batch_size, fg_fraction, fg_iou, bg_iou, gen):
    """The loop reference: find foreground and background by visiting every region, then draw."""
    fg = [r for r in range(len(iou)) if iou[r] >= fg_iou]
    bg = [r for r in range(len(iou)) if bg_iou[0] <= iou[r] < bg_iou[1]]
    n_fg = min(round(batch_size * fg_fraction), len(fg))
    n_bg = min(batch_size - n_fg, len(bg))
    pick_fg = [fg[k] for k in sample_without_replacement(len(fg), n_fg, gen).tolist()]
    return pick_fg, [bg[k] for k in sample_without_replacement(len(bg), n_bg, gen).tolist()]


def test_region_index_draws_what_a_walk_of_every_region_draws():
    iou = torch.rand(3000, generator=torch.Generator().manual_seed(1)) * 0.8
    index = RegionIndex.build(iou, 0.5, (0.0, 0.5))
    assert len(index.fg) + len(index.bg) == 3000
    gen, ref_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(4):
        fg, bg = index.sample(128, 0.25, gen)
        want_fg, want_bg = _walk_every_region(iou.tolist(), 128, 0.25, 0.5, (0.0, 0.5), ref_gen)
        assert fg.tolist() == want_fg and bg.tolist() == want_bg
        assert (len(set(fg.tolist())), len(set(bg.tolist()))) == (32, 96)
    few = RegionIndex.build(torch.tensor([0.9, 0.2, 0.7, 0.05]), 0.5, (0.1, 0.5))
    fg, bg = few.sample(128, 0.25, gen)
    assert sorted(fg.tolist()) == [0, 2] and bg.tolist() == [1]  # only these exist in the bands
