"""The hollow probe's mode: skipped operations' estimates against hand-computed FLOPs and bytes, what
it leaves behind (shapes, real zeros, hollow tensors), and what it lets run."""

from __future__ import annotations

import pytest
import torch
from rcnn_bench.benchmarks.harness.plan import DEVICES, named_rates, probe_rates
from rcnn_bench.benchmarks.machine.estimate import SMALL, Hollow, HollowTimer, Rates, measure_rates
from rcnn_bench.pipelines.parts.backbones import BackboneConfig, build_backbone
from torch import nn

# 1 GFLOP/s for every kind but the factorizations (0.5), 1 GB/s of memory: seconds are giga-units.
RATES = Rates(conv=1.0, conv_backward=2.0, matmul=4.0, linalg=0.5, memory=1.0, source="test")


def test_a_skipped_product_costs_its_flops_at_the_matmul_rate_and_leaves_its_shape():
    x, w = torch.ones(64, 512), torch.ones(512, 1024)
    with Hollow(RATES, min_flops=0) as hollow:
        big = x @ w  # 64 x 1024 = 65536 elements: SMALL, real zeros
        small = x[:2] @ w[:, :3]
    assert big.shape == (64, 1024) and small.shape == (2, 3)
    assert torch.equal(small, torch.zeros(2, 3))
    assert hollow.skipped == 2
    flops = 2 * 64 * 512 * 1024 + 2 * 2 * 512 * 3
    assert hollow.seconds == pytest.approx(flops / 4e9)


def test_large_outputs_are_hollow_and_what_follows_them_costs_its_bytes():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.ones(1, 3, 128, 128)
    with torch.no_grad(), Hollow(RATES, min_flops=0) as hollow:
        y = conv(x)  # 8 x 128 x 128 = 131072 elements > SMALL
        conv_s = 2 * 8 * 3 * 9 * 128 * 128 / 1e9
        assert hollow.seconds == pytest.approx(conv_s)
        z = torch.relu(y)
        assert y.numel() > SMALL and y.stride() == (0, 0, 0, 0) and z.stride() == (0, 0, 0, 0)
        assert hollow.seconds == pytest.approx(conv_s + 2 * y.numel() * 4 / 1e9)  # read + written
        total = z.sum()  # one element: real
    assert total.item() == 0.0 and hollow.skipped == 3


def test_small_work_runs_and_in_place_writes_from_hollow_tensors_are_skipped():
    a = torch.arange(6.0)
    keep = torch.ones(SMALL + 1)
    with Hollow(RATES) as hollow:
        doubled = a * 2  # no heavy op, no hollow input: computed
        small_product = torch.ones(3, 3) @ torch.ones(3, 3)  # below min_flops: computed
        h = torch.ones(512, 512) @ torch.ones(512, 512 + 2)  # hollow
        keep.add_(h.flatten()[: SMALL + 1])  # skipped: keep is left as it was
    assert torch.equal(doubled, torch.arange(0.0, 12.0, 2.0))
    assert torch.equal(small_product, torch.full((3, 3), 3.0))
    assert torch.equal(keep, torch.ones(SMALL + 1))
    assert hollow.skipped == 4  # the product, flatten, the slice, add_


def test_backward_through_a_hollow_network_costs_the_gradient_convolutions():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    x = torch.ones(1, 4, 32, 32, requires_grad=True)
    with Hollow(RATES, min_flops=0) as hollow:
        forward = hollow.seconds
        loss = conv(x).sum()
        forward = hollow.seconds
        loss.backward()
    macs = 4 * 4 * 9 * 32 * 32
    assert forward == pytest.approx(2 * macs / 1e9)
    # torch counts the input and the weight gradient, each as many FLOPs as the forward, at 2 GFLOP/s.
    assert hollow.seconds - forward == pytest.approx(2 * 2 * macs / 2e9)
    assert x.grad.shape == x.shape and conv.weight.grad.shape == conv.weight.shape


def test_a_skipped_svd_costs_the_textbook_flops():
    w = torch.ones(100, 40, dtype=torch.float64)
    with Hollow(RATES, min_flops=0) as hollow:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert (u.shape, s.shape, vh.shape) == ((100, 40), (40,), (40, 40))
    assert hollow.seconds == pytest.approx((4 * 100 * 40**2 + 22 * 40**3) / 0.5e9)


def test_a_hollow_timer_adds_the_skipped_time_to_its_stage():
    hollow = Hollow(RATES, min_flops=0)
    timer = HollowTimer("cpu", hollow)
    with hollow, timer.stage("fc"):
        torch.ones(8, 16) @ torch.ones(16, 4)
    wall = timer.seconds["fc"] - 2 * 8 * 16 * 4 / 4e9
    assert 0 < wall < 1.0


def test_rates_measured_on_the_backbone_are_positive_and_named_ones_come_from_the_table():
    backbone = build_backbone(BackboneConfig(name="tiny", weights="none"))
    here = measure_rates(backbone, "fp32")
    assert min(here.conv, here.conv_backward, here.matmul, here.linalg, here.memory) > 0
    assert all(p.grad is None for p in backbone.parameters())
    h100 = named_rates("h100", "tf32", DEVICES, linalg=7.0)
    assert (h100.conv, h100.matmul, h100.memory, h100.linalg) == (104000, 394000, 2950, 7.0)
    with pytest.raises(ValueError, match=r"^--plan-for: 'k40' is not in .*devices.yaml"):
        named_rates("k40", "tf32", DEVICES, 1.0)
    with pytest.raises(
        ValueError, match=r"no figures at bench.precision bf16 \(it has: fp32, tf32"
    ):
        named_rates("h100", "bf16", DEVICES, 1.0)
    assert probe_rates("full", None, backbone, torch.device("cpu"), "fp32") is None
    with pytest.raises(ValueError, match="--plan-for needs --probe estimate"):
        probe_rates("full", "h100", backbone, torch.device("cpu"), "fp32")
