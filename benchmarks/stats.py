"""Summaries of timing samples and the bootstrap interval of a speedup."""

from __future__ import annotations

import numpy as np

__all__ = ["summarize", "bootstrap_ratio"]


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
