from __future__ import annotations

import numpy as np
import pytest
import torch
from rcnn_bench.pipelines.parts.boxes import flip_boxes
from rcnn_bench.pipelines.parts.warp import dilate_for_context, mirror_regions, warp_regions
from torch.testing import assert_close


def slow_warp(image: np.ndarray, box, size: int, pad: int) -> np.ndarray:
    """Per-region, per-pixel reference: dilate, sample each output pixel's centre bilinearly, zero
    outside the image."""
    c, h, w = image.shape
    scale = size / (size - 2 * pad)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * scale, (box[3] - box[1]) / 2 * scale
    x1, y1, x2, y2 = cx - hw, cy - hh, cx + hw, cy + hh
    out = np.zeros((c, size, size), np.float64)
    for i in range(size):
        for j in range(size):
            x = x1 + (j + 0.5) * (x2 - x1) / size  # continuous coordinate
            y = y1 + (i + 0.5) * (y2 - y1) / size
            if not (0 <= x <= w and 0 <= y <= h):
                continue
            px = min(max(x - 0.5, 0), w - 1)  # pixel-centre index, edge-clamped
            py = min(max(y - 0.5, 0), h - 1)
            x0, y0 = int(np.floor(px)), int(np.floor(py))
            x1i, y1i = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
            fx, fy = px - x0, py - y0
            out[:, i, j] = (
                image[:, y0, x0] * (1 - fx) * (1 - fy)
                + image[:, y0, x1i] * fx * (1 - fy)
                + image[:, y1i, x0] * (1 - fx) * fy
                + image[:, y1i, x1i] * fx * fy
            )
    return out


@pytest.mark.parametrize("pad", [0, 3])
def test_warp_matches_slow_reference(pad):
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(3, 23, 31, generator=gen, dtype=torch.float64)
    boxes = torch.tensor(
        [
            [4.0, 3, 20, 15],
            [0, 0, 31, 23],
            [10.5, 2.25, 12.5, 20],
            [-6, -4, 9, 7],
            [25, 15, 40, 30],
        ],
        dtype=torch.float64,
    )
    got = warp_regions(image, boxes, 12, pad)
    assert got.shape == (5, 3, 12, 12)
    for k, box in enumerate(boxes.tolist()):
        assert_close(
            got[k], torch.from_numpy(slow_warp(image.numpy(), box, 12, pad)), atol=1e-9, rtol=0
        )


def test_outside_is_zero_and_context_geometry():
    image = torch.ones(3, 20, 20)
    got = warp_regions(image, torch.tensor([[-20.0, -20, -5, -5]]), 8, 0)
    assert got.abs().sum() == 0
    grown = dilate_for_context(torch.tensor([[10.0, 10, 26, 26]]), 16, 4)  # box fills the middle 8
    assert_close(grown, torch.tensor([[2.0, 2, 34, 34]]))
    with pytest.raises(ValueError):
        dilate_for_context(grown, 16, 8)


def test_no_boxes():
    assert warp_regions(torch.zeros(3, 10, 10), torch.zeros((0, 4)), 8, 2).shape == (0, 3, 8, 8)


def test_mirroring_flips_the_warped_region_exactly():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(3, 30, 40, generator=gen)
    boxes = torch.tensor([[2.0, 3, 20, 25], [10, 0, 39, 17], [0, 5, 12, 30], [5, 5, 30, 28]])
    regions = warp_regions(image, boxes, 16, 2)
    flipped = torch.tensor([True, False, False, True])
    out = mirror_regions(regions, flipped)
    for k in range(4):
        assert torch.equal(out[k], regions[k].flip(2) if flipped[k] else regions[k])
    # A mirrored region is the region of the mirrored box in the mirrored image, as when Caffe mirrors
    # the window it cropped (to float rounding of the sample positions).
    mirrored = warp_regions(image.flip(2), flip_boxes(boxes, 40), 16, 2)
    assert_close(regions.flip(3), mirrored, atol=1e-4, rtol=0)
