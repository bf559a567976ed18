"""Tolerances from A/A runs, against figures worked out by hand."""

from __future__ import annotations

import pytest
from rcnn_bench.benchmarks.gate.calibrate import latency_drift, tolerances
from rcnn_bench.benchmarks.gate.compare import _latency_row


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
    assert tols["speedup_train[b/a]"] == 0.15  # its floor


def test_latency_drift_by_hand():
    ids = [f"i{k}" for k in range(5)]
    run1 = {
        "a": dict(zip(ids, [10, 20, 30, 40, 50], strict=True)),
        "b": dict(zip(ids, [1, 1, 1, 1, 1], strict=True)),
    }
    # a: every image 10% slower but one (median ratio 1.1); b: medians 1.0 and 1.25.
    run2 = {
        "a": dict(zip(ids, [11, 22, 33, 44, 50], strict=True)),
        "b": dict(zip(ids, [1, 1, 1, 1, 2], strict=True)),
    }
    run3 = {
        "a": dict(zip(ids, [10, 20, 30, 40, 50], strict=True)),
        "b": dict(zip(ids, [1.25] * 5, strict=True)),
    }
    drift = latency_drift([run1, run2, run3])
    # a: pairs 1-2 ratio 1.1 and 2-3 ratio 1/1.1 (|1.1 - 1| = 0.1 either way), 1-3 ratio 1.
    assert drift["a"] == pytest.approx(0.1)
    # b: 1-2 median 1, 1-3 1.25, 2-3 median of (1.25, 1.25, 1.25, 1.25, 0.625) = 1.25 -> 0.25.
    assert drift["b"] == pytest.approx(0.25)


def test_min_effect_sets_the_smallest_latency_change_that_counts():
    ids = [f"i{k}" for k in range(10)]
    a = dict(zip(ids, [10.0 + k for k in range(10)], strict=True))
    b = {k: v * 1.1 for k, v in a.items()}  # every image 10% slower: Wilcoxon p = 2/2^10
    assert _latency_row("x", a, b)["verdict"] == "worse"  # 10% >= the default 5%
    assert _latency_row("x", a, b, min_effect=0.2)["verdict"] == "same"  # 10% < 20%


def test_seed_spread_needs_five_seeds_and_keeps_each_pipelines_spread(monkeypatch, tmp_path):
    from rcnn_bench.benchmarks.evaluation.seeds import summarize_seeds
    from rcnn_bench.benchmarks.gate import calibrate

    def fake(maps):
        runs = {
            name: [{"seed": s, "voc07": m, "per_class": {}, "curves": []} for s, m in enumerate(v)]
            for name, v in maps.items()
        }
        return {"seeds": summarize_seeds(runs)}

    five = fake({"a": [0.70, 0.74, 0.72, 0.76, 0.68], "b": [0.5] * 5})
    monkeypatch.setattr(calibrate, "read_results", lambda folder: five)
    spread = calibrate.seed_spread_of(tmp_path / "run")
    assert spread["seeds"] == [0, 1, 2, 3, 4] and spread["run"] == "run"
    a = spread["pipelines"]["a"]  # as test_stats works it out: sd sqrt(0.004 / 4)
    assert a["mean"] == pytest.approx(0.72) and a["sd"] == pytest.approx(0.0316228, abs=1e-7)
    assert spread["pipelines"]["b"]["sd"] == 0.0
    monkeypatch.setattr(calibrate, "read_results", lambda folder: fake({"a": [0.7, 0.8, 0.9]}))
    with pytest.raises(ValueError, match="at least 5 training seeds"):
        calibrate.seed_spread_of(tmp_path / "run")
    with pytest.raises(ValueError, match="at least 5 seeds"):
        calibrate.calibrate("c.yaml", 3, tmp_path / "b.json", [], tmp_path, seeds=3)
