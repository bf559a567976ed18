from __future__ import annotations

import numpy as np
import torch
from rcnn_bench.pipelines.parts.backbones import BackboneConfig, build_backbone
from rcnn_bench.pipelines.parts.roi_pool import pool_rois, roi_max_pool
from torch.testing import assert_close


def slow_roi_pool(features: torch.Tensor, roi, p: int, scale: float) -> torch.Tensor:
    """Caffe's RoI max pooling, one bin at a time (coordinates rounded half away from zero)."""
    c, h, w = features.shape
    x1, y1, x2, y2 = (int(np.floor(v * scale + 0.5)) for v in roi)
    rw, rh = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    out = torch.zeros(c, p, p)
    for i in range(p):
        for j in range(p):
            hs = min(max(int(np.floor(i * rh / p)) + y1, 0), h)
            he = min(max(int(np.ceil((i + 1) * rh / p)) + y1, 0), h)
            ws = min(max(int(np.floor(j * rw / p)) + x1, 0), w)
            we = min(max(int(np.ceil((j + 1) * rw / p)) + x1, 0), w)
            if he > hs and we > ws:
                out[:, i, j] = features[:, hs:he, ws:we].amax(dim=(1, 2))
    return out


def test_roi_pool_matches_slow_reference():
    net = build_backbone(BackboneConfig())  # the tiny net: pool 4 x 4, stride 16
    features = torch.randn(1, 5, 9, 11)
    rois = torch.tensor(
        [[0, 0.0, 0, 175, 143], [0, 16, 32, 80, 64], [0, 40, 8, 47, 15], [0, 150, 100, 300, 300]]
    )
    got = pool_rois(net, features, rois)  # pool 4x4 at scale 1/16
    for k in range(len(rois)):
        assert_close(got[k], slow_roi_pool(features[0], rois[k, 1:].tolist(), 4, 1 / 16))


def test_roi_max_pool_keeps_the_maps_dtype_and_their_values():
    # bf16 maps pool in float32 (torchvision has no bf16 CPU kernel): a max picks one of the values.
    features = torch.randn(1, 3, 8, 8).to(torch.bfloat16)
    rois = torch.tensor([[0, 0.0, 0, 63, 63], [0, 16, 16, 47, 31]])
    got = roi_max_pool(features, rois, 2, 1 / 8)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, roi_max_pool(features.float(), rois, 2, 1 / 8).to(torch.bfloat16))
