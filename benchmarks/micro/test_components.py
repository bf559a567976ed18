"""pytest-benchmark micro-benchmarks of the stages R-CNN and Fast R-CNN differ in (warped regions
through the CNN against one feature map and RoI pooling), and the stages every pipeline shares.

Run with `make microbench` (JSON saved under reports/microbench/ for comparison across commits:
`pytest-benchmark compare`). Inputs mimic the CPU default: a 192x256 image, 300 proposals, the tiny
backbone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rcnn_bench.pipelines.parts.backbones import BackboneConfig, build_backbone
from rcnn_bench.pipelines.parts.boxes import boxes_to_rois
from rcnn_bench.pipelines.parts.proposals import ProposalConfig, selective_search
from rcnn_bench.pipelines.parts.warp import warp_regions
from torchvision.ops import batched_nms, roi_pool

R = 300


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(3, 192, 256, generator=gen)
    xy = torch.rand(R, 2, generator=gen) * torch.tensor([200.0, 140.0])
    boxes = torch.cat((xy, xy + 8 + torch.rand(R, 2, generator=gen) * 48), 1)
    backbone = build_backbone(BackboneConfig()).eval()
    return image, boxes, backbone


def test_selective_search(benchmark):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (192, 256, 3), dtype=np.uint8)
    image[40:120, 60:160] = (200, 30, 30)
    boxes = benchmark(selective_search, image, ProposalConfig())
    assert len(boxes) > 0


def test_rcnn_warp(benchmark, inputs):
    image, boxes, backbone = inputs
    out = benchmark(warp_regions, image, boxes, backbone.input_size, 4)
    assert out.shape == (R, 3, 64, 64)


def test_fast_rcnn_roi_pool(benchmark, inputs):
    image, boxes, backbone = inputs
    features = backbone.trunk(image[None]).detach()
    rois = boxes_to_rois([boxes])
    out = benchmark(roi_pool, features, rois, (4, 4), 1 / 16)
    assert out.shape == (R, backbone.channels, 4, 4)


@torch.no_grad()
def test_cnn_on_warped_regions(benchmark, inputs):
    image, boxes, backbone = inputs
    regions = warp_regions(image, boxes, backbone.input_size, 4)
    out = benchmark(lambda: backbone.trunk(regions))
    assert out.shape[0] == R


@torch.no_grad()
def test_cnn_on_one_feature_map(benchmark, inputs):
    image, _, backbone = inputs
    out = benchmark(lambda: backbone.trunk(image[None]))
    assert out.shape[0] == 1


def test_svm_scoring(benchmark):
    gen = torch.Generator().manual_seed(0)
    fc7, w, b = (
        torch.randn(R, 256, generator=gen),
        torch.randn(256, 20, generator=gen),
        torch.randn(20),
    )
    out = benchmark(lambda: fc7 @ w + b)
    assert out.shape == (R, 20)


def test_nms(benchmark, inputs):
    _, boxes, _ = inputs
    boxes = boxes.repeat(4, 1)
    scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(len(boxes)) % 4
    keep = benchmark(batched_nms, boxes, scores, labels, 0.3)
    assert 0 < len(keep) <= len(boxes)
