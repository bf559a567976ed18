"""Tolerances from A/A runs, against figures worked out by hand."""

from __future__ import annotations

import pytest

from benchmarks.calibrate import tolerances


def _results(speedup: float, train: float, map_: float) -> dict:
    inference = {"value": speedup, "ci95": [speedup, speedup], "paired": None}
    return {
        "speedup": {"b/a": {"inference": inference, "train": train}},
        "pipelines": {"a": {"map": {"voc07": map_}}, "b": {"map": {"voc07": map_}}},
    }


def test_tolerance_is_twice_the_largest_deviation_or_the_floor():
    runs = [_results(10.0, 2.0, 0.5), _results(9.0, 1.5, 0.5), _results(11.0, 2.5, 0.5)]
    tols, spread = tolerances(runs)
    # Inference speedups 9, 10, 11: mean 10, largest deviation 1 = 10% of it -> tolerance 20%.
    assert spread["speedup_inference[b/a]"] == pytest.approx(
        {"mean": 10.0, "min": 9.0, "max": 11.0, "deviation": 0.1}
    )
    assert tols["speedup_inference[b/a]"] == pytest.approx(0.2)
    # Training speedups 1.5, 2, 2.5: deviation 0.5 / 2 = 25% -> 50%.
    assert tols["speedup_train[b/a]"] == pytest.approx(0.5)
    # mAP identical in every run: the floor, 0.01 absolute.
    assert tols["map[a]"] == tols["map[b]"] == 0.01


def test_a_quiet_speedup_gets_the_floor():
    runs = [_results(10.0, 2.0, 0.5), _results(10.1, 2.0, 0.5), _results(9.9, 2.0, 0.5)]
    tols, _ = tolerances(runs)
    assert tols["speedup_inference[b/a]"] == 0.07  # 2 x 1% is under the 7% floor
    assert tols["speedup_train[b/a]"] == 0.05
