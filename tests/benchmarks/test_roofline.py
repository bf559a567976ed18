"""The machine's ceilings and each stage's share of them, against figures worked out by hand."""

from __future__ import annotations

import pytest
import torch
from rcnn_bench.benchmarks.machine.roofline import (
    CostTimer,
    reference_gflops,
    stage_efficiency,
    with_reference,
)
from rcnn_bench.benchmarks.reporting import tables
from torch import nn

PEAKS = {"matmul_float32_gflops": 100.0, "bandwidth_gbs": 10.0}
GPU_PEAKS = {
    "matmul_float32_gflops": 50_000.0,
    "matmul_tf32_gflops": 400_000.0,
    "matmul_bfloat16_gflops": 800_000.0,
    "matmul_float16_gflops": 790_000.0,
    "bandwidth_gbs": 3000.0,
}


def test_stage_efficiency_by_hand():
    # conv: 2e9 FLOPs over 1e8 bytes (intensity 20, ceiling min(100, 10 * 20) = 100) in 40 ms:
    # 50 GFLOP/s, half the ceiling. copy: 1e6 FLOPs over 1e7 bytes (intensity 0.1, ceiling 1 GFLOP/s)
    # in 2 ms: 0.5 GFLOP/s. A stage with no FLOPs, or no time, has no entry.
    eff = stage_efficiency(
        {"conv": 2_000_000_000, "copy": 1_000_000, "nms": 0, "untimed": 5},
        {"conv": 100_000_000, "copy": 10_000_000},
        {"conv": 40.0, "copy": 2.0, "nms": 1.0},
        PEAKS,
    )
    assert set(eff) == {"conv", "copy"}
    assert eff["conv"]["intensity"] == pytest.approx(20.0)
    assert eff["conv"]["gflops_per_s"] == pytest.approx(50.0)
    assert eff["conv"]["ceiling_gflops_per_s"] == pytest.approx(100.0)
    assert eff["conv"]["share_of_ceiling"] == pytest.approx(0.5)
    assert eff["copy"]["ceiling_gflops_per_s"] == pytest.approx(1.0)
    assert eff["copy"]["share_of_ceiling"] == pytest.approx(0.5)
    assert eff["copy"]["share_of_matmul_peak"] == pytest.approx(0.005)


def test_shares_are_taken_of_the_precision_the_passes_run_in():
    assert with_reference(PEAKS, "fp32")["compute_kind"] == "float32"
    assert with_reference(PEAKS, "tf32")["compute_kind"] == "float32"  # a CPU: only float32 probed
    assert with_reference(PEAKS, "bf16")["compute_kind"] == "float32"
    assert with_reference(GPU_PEAKS, "tf32")["compute_gflops"] == 400_000.0
    assert with_reference(GPU_PEAKS, "fp32")["compute_gflops"] == 50_000.0
    assert with_reference(GPU_PEAKS, "bf16")["compute_gflops"] == 800_000.0
    assert with_reference(GPU_PEAKS, "fp16")["compute_kind"] == "float16"
    assert reference_gflops(PEAKS) == 100.0  # a results file from before the reference was kept
    bf16 = with_reference(GPU_PEAKS, "bf16")
    eff = stage_efficiency({"fc": 4_000_000}, {"fc": 1}, {"fc": 1.0}, bf16)
    assert eff["fc"]["share_of_matmul_peak"] == pytest.approx(4.0 / 800_000.0)


def test_cost_timer_counts_a_linear_layers_flops_and_bytes():
    layer = nn.Linear(8, 3, bias=False)
    x = torch.ones(5, 8)
    timer = CostTimer("cpu")
    with torch.inference_mode(), timer.stage("fc"):
        layer(x)
    assert timer.flops == {"fc": 2 * 5 * 8 * 3}
    # One aten.linear: it reads x (5x8) and the weight (3x8) and writes 5x3 float32s, 4 bytes each.
    assert timer.bytes["fc"] == 4 * (5 * 8 + 3 * 8 + 5 * 3)
    assert set(timer.seconds) == {"fc"}


def test_stages_below_half_the_rate_are_explained():
    def stage(flops, share, intensity, ceiling, ms=10.0):
        return {
            "flops": flops,
            "ms": ms,
            "share_of_matmul_peak": share,
            "intensity": intensity,
            "ceiling_gflops_per_s": ceiling,
            "share_of_ceiling": share * 100.0 / ceiling,
        }

    eff = {
        "conv": stage(8e9, 0.3, 5.0, 50.0),  # intensity 5 < balance 100 / 10: memory-bound
        "fc": stage(1.5e9, 0.2, 20.0, 100.0),  # enough intensity, still at 20%
        "nms": stage(1e6, 0.001, 0.1, 1.0),  # under a tenth of the FLOPs: not a heavy stage
        "warp": stage(1e9, 0.6, 30.0, 100.0),  # above half: nothing to explain
    }
    results = {
        "env": {"peaks": {"matmul_float32_gflops": 100.0, "bandwidth_gbs": 10.0}},
        "speedup": {},
        "pipelines": {"a": {"label": "A", "inference": {"efficiency": eff}}},
    }
    notes = tables.efficiency_notes(results)
    assert notes == [
        "A conv: 30% of the rate (8.00 GFLOP per image in 10.0 ms); at 5.0 FLOP per byte moved, "
        "below the machine's balance of 10.0, it is bound by memory bandwidth, whose ceiling there "
        "(50 GFLOP/s) it reaches 60% of.",
        "A fc: 20% of the rate (1.50 GFLOP per image in 10.0 ms); its 20 FLOP per byte would allow "
        "the full rate, so the gap is the kernels' own: operands too small or too oddly shaped to "
        "keep the units busy, and the calls' fixed costs.",
    ]
