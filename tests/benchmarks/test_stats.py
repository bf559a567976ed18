from __future__ import annotations

import numpy as np
import pytest

from benchmarks.stats import bootstrap_ratio, summarize


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
