"""Summaries of timing samples and the bootstrap interval of a speedup."""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_ratio", "paired_ratio", "summarize"]


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
