"""Summaries of timing samples and the bootstrap interval of a speedup; the spread of an accuracy
over training seeds and the paired difference of two pipelines' accuracies."""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["bootstrap_ratio", "paired_ratio", "seed_difference", "seed_spread", "summarize"]

# How results.json and the report name the interval of seed_spread and seed_difference.
SEED_INTERVAL = "95% t-interval over training seeds (mean +- t(0.975, n-1) x sd / sqrt(n))"


def summarize(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    """Median, 90th percentile and mean of per-image times (ms)."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no timing samples to summarize")
    return {
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "mean": float(x.mean()),
    }


def bootstrap_ratio(
    numerator: np.ndarray | list[float],
    denominator: np.ndarray | list[float],
    samples: int = 2000,
    seed: int = 0,
    paired: bool = True,
) -> dict[str, float | list[float]]:
    """Ratio of medians with a percentile-bootstrap 95% interval.

    Args:
        numerator: per-image times of the slower pipeline (e.g. R-CNN).
        denominator: per-image times of the faster one; with ``paired``, index i is the same image.
        samples: bootstrap resamples.
        seed: the resampling is deterministic given the seed.
        paired: resample images (both pipelines together), as the harness times them image by image.

    Returns:
        {"value": median(num) / median(den), "ci95": [low, high], "samples": samples}.
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.size == 0 or den.size == 0:
        raise ValueError("bootstrap needs samples on both sides")
    if paired and num.size != den.size:
        raise ValueError(f"paired bootstrap needs equal sizes, got {num.size} and {den.size}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, num.size, size=(samples, num.size))
    j = i if paired else rng.integers(0, den.size, size=(samples, den.size))
    ratios = np.median(num[i], axis=1) / np.median(den[j], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {
        "value": float(np.median(num) / np.median(den)),
        "ci95": [float(low), float(high)],
        "samples": samples,
    }


def paired_ratio(
    numerator: np.ndarray | list[float],
    denominator: np.ndarray | list[float],
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """Speedup from per-image paired ratios: numerator[i] / denominator[i] is one image's speedup.

    The figure is their geometric mean; its 95% interval comes from a bootstrap over images of that
    mean (how well these images pin the mean down). The spread of the ratios themselves (how much the
    images differ, e.g. in proposal count) is reported beside it, apart: it is a property of the data,
    not measurement noise.

    Args:
        numerator: per-image times of the baseline (e.g. R-CNN).
        denominator: per-image times of the candidate, index i the same image.
        samples: bootstrap resamples.
        seed: the resampling is deterministic given the seed.

    Returns:
        {"geomean", "ci95": [low, high], "spread": {"min", "p10", "median", "p90", "max"},
        "images", "samples"}.
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.size == 0 or num.size != den.size:
        raise ValueError(f"paired ratios need equal, non-zero sizes, got {num.size} and {den.size}")
    logs = np.log(num / den)
    rng = np.random.default_rng(seed)
    means = logs[rng.integers(0, logs.size, size=(samples, logs.size))].mean(axis=1)
    low, high = np.exp(np.percentile(means, [2.5, 97.5]))
    ratios = np.exp(logs)
    p10, median, p90 = np.percentile(ratios, [10, 50, 90])
    return {
        "geomean": float(np.exp(logs.mean())),
        "ci95": [float(low), float(high)],
        "spread": {
            "min": float(ratios.min()),
            "p10": float(p10),
            "median": float(median),
            "p90": float(p90),
            "max": float(ratios.max()),
        },
        "images": int(num.size),
        "samples": samples,
    }


def seed_spread(values: list[float] | np.ndarray) -> dict:
    """Mean, sample standard deviation and the 95% t-interval of the mean of one figure over
    training seeds (each seed one independent draw of the training).

    mean +- t(0.975, n - 1) * sd / sqrt(n), sd with n - 1 in its denominator. One seed has no spread:
    its sd and interval are None.

    Returns:
        {"n", "mean", "sd", "ci95": [low, high] or None, "values"}.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no seeds to summarize")
    mean = float(x.mean())
    if x.size == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None, "values": x.tolist()}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, x.size - 1)) * sd / np.sqrt(x.size)
    return {
        "n": int(x.size),
        "mean": mean,
        "sd": sd,
        "ci95": [mean - half, mean + half],
        "values": x.tolist(),
    }


def seed_difference(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> dict:
    """``a - b`` seed by seed (index i: both trained under the same seed) and its seed_spread; the
    two differ in accuracy on this data where the interval excludes zero.

    Returns:
        seed_spread's record of the differences, with "distinguishable": the interval excludes 0
        (False with one seed).
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size != y.size:
        raise ValueError(f"a paired difference needs the same seeds, got {x.size} and {y.size}")
    out = seed_spread(x - y)
    ci = out["ci95"]
    out["distinguishable"] = ci is not None and (ci[0] > 0 or ci[1] < 0)
    return out
