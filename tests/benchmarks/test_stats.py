from __future__ import annotations

import numpy as np
import pytest
from rcnn_bench.benchmarks.evaluation.stats import bootstrap_ratio, summarize


def test_summarize_known_samples():
    s = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s == {"median": 3.0, "p90": pytest.approx(7.6), "mean": 4.0}
    with pytest.raises(ValueError):
        summarize([])


def test_constant_ratio_has_a_zero_width_interval():
    r = bootstrap_ratio([50.0] * 20, [10.0] * 20, samples=500)
    assert r["value"] == 5.0 and r["ci95"] == [5.0, 5.0]


def test_interval_covers_the_ratio_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    small = bootstrap_ratio(rng.normal(100, 10, 16), rng.normal(10, 1, 16), samples=2000, seed=1)
    large = bootstrap_ratio(rng.normal(100, 10, 400), rng.normal(10, 1, 400), samples=2000, seed=1)
    for r in (small, large):
        assert r["ci95"][0] <= r["value"] <= r["ci95"][1]
        assert 8 < r["ci95"][0] and r["ci95"][1] < 12.5
    assert large["ci95"][1] - large["ci95"][0] < small["ci95"][1] - small["ci95"][0]


def test_same_seed_same_interval_and_paired_sizes():
    a, b = [5.0, 7.0, 9.0, 6.0], [1.0, 1.5, 1.2, 0.9]
    assert bootstrap_ratio(a, b, seed=3) == bootstrap_ratio(a, b, seed=3)
    with pytest.raises(ValueError, match="equal sizes"):
        bootstrap_ratio(a, b[:3])


def test_seed_spread_of_a_few_numbers_by_hand():
    from rcnn_bench.benchmarks.evaluation.stats import seed_spread

    s = seed_spread([0.70, 0.74, 0.72, 0.76, 0.68])
    # mean 0.72; deviations -0.02 0.02 0 0.04 -0.04: sum of squares 0.004, / 4 = 0.001, sd 0.031623;
    # t(0.975, 4) = 2.776445; half width 2.776445 * 0.031623 / sqrt(5) = 0.039265
    assert s["n"] == 5 and s["mean"] == pytest.approx(0.72)
    assert s["sd"] == pytest.approx(0.0316228, abs=1e-7)
    assert s["ci95"] == pytest.approx([0.680735, 0.759265], abs=1e-6)
    one = seed_spread([0.5])
    assert one["sd"] is None and one["ci95"] is None and one["mean"] == 0.5


def test_seed_difference_ranks_only_where_the_interval_excludes_zero():
    from rcnn_bench.benchmarks.evaluation.stats import seed_difference

    # differences 0.05 0.03 0.04: mean 0.04, sd 0.01, t(0.975, 2) = 4.302653, half 0.024841
    d = seed_difference([0.80, 0.78, 0.79], [0.75, 0.75, 0.75])
    assert d["mean"] == pytest.approx(0.04) and d["sd"] == pytest.approx(0.01)
    assert d["ci95"] == pytest.approx([0.015159, 0.064841], abs=1e-6) and d["distinguishable"]
    # differences 0.05 -0.03 0.01: mean 0.01, sd 0.04, half 4.302653 * 0.04 / sqrt(3) = 0.099366
    n = seed_difference([0.80, 0.72, 0.76], [0.75, 0.75, 0.75])
    assert n["ci95"] == pytest.approx([-0.089366, 0.109366], abs=1e-6)
    assert not n["distinguishable"]
    assert not seed_difference([0.9], [0.1])["distinguishable"]  # one seed: no interval, no rank
    with pytest.raises(ValueError):
        seed_difference([0.1, 0.2], [0.1])
