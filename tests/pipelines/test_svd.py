from __future__ import annotations

import torch
from rcnn_bench.pipelines.parts.svd import compress_head, truncate_linear
from torch import nn
from torch.testing import assert_close


def test_full_rank_is_exact_and_truncation_shrinks_cost():
    layer = nn.Linear(40, 30)
    x = torch.randn(7, 40)
    full = truncate_linear(layer, 30)
    assert_close(full(x), layer(x), atol=1e-5, rtol=1e-5)
    small = truncate_linear(layer, 5)
    assert small[0].weight.shape == (5, 40) and small[1].weight.shape == (30, 5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in layer.parameters())


def test_compress_head_full_ranks_same_outputs():
    head = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 32), nn.ReLU()
    ).eval()
    x = torch.randn(5, 64)
    assert_close(compress_head(head, (32, 32)).eval()(x), head(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(compress_head(head, (2, 2)).eval()(x), head(x))
