"""Accuracy over training seeds: each pipeline's VOC07 mAP as mean, sd and 95% interval over the seeds
of ``bench.seeds``, each pair's paired difference, and the sentences that rank two pipelines only where
the interval of their difference excludes zero (docs/design.md, "Accuracy over seeds")."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

from rcnn_bench.benchmarks.evaluation.stats import SEED_INTERVAL, seed_difference, seed_spread

__all__ = ["ranking_lines", "read_seed_spread", "summarize_seeds"]


def summarize_seeds(runs: dict[str, list[dict]]) -> dict:
    """results.json's ``seeds`` block from each pipeline's runs.

    Args:
        runs: per pipeline, one record per training seed in the same seed order for every pipeline:
            {"seed", "voc07", "per_class": {class: AP or None}, "curves"}.

    Returns:
        {"seeds", "interval", "pipelines": {name: {"voc07": seed_spread, "runs"}},
        "differences": {"a-b": {"a", "b", **seed_difference(a's mAPs, b's)}}}, pairs in config order.
    """
    names = list(runs)
    maps = {name: [r["voc07"] for r in runs[name]] for name in names}
    return {
        "seeds": [r["seed"] for r in runs[names[0]]],
        "interval": SEED_INTERVAL,
        "pipelines": {
            name: {"voc07": seed_spread(maps[name]), "runs": runs[name]} for name in names
        },
        "differences": {
            f"{a}-{b}": {"a": a, "b": b, **seed_difference(maps[a], maps[b])}
            for a, b in combinations(names, 2)
        },
    }


def read_seed_spread(path: str | None) -> dict | None:
    """The calibrated seed spread of a baseline file (``bench.seed_spread``; None: none): per pipeline
    seed_spread of its VOC07 mAP over the calibration's seeds.

    Raises:
        ValueError: the file is missing, not JSON, or holds no seed spread.
    """
    if path is None:
        return None
    try:
        baseline = json.loads(Path(path).read_text())
        return dict(baseline["seed_spread"]["pipelines"])
    except FileNotFoundError:
        raise ValueError(f"bench.seed_spread: {path} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(
            f"bench.seed_spread: {path} holds no seed spread (`rcnn-bench calibrate` writes one)"
        ) from None


def ranking_lines(block: dict, labels: dict[str, str]) -> list[str]:
    """What the console and the report say about accuracy: each pipeline's mAP with its spread, then
    per pair either which is more accurate (the difference's interval excludes zero) or that the two
    are not distinguishable on this data. With one seed nothing is ranked, and the block's
    "calibrated" spread (read_seed_spread), where there is one, is shown beside each mAP."""
    n, calibrated = len(block["seeds"]), block.get("calibrated")
    lines = []
    for name, rec in block["pipelines"].items():
        s = rec["voc07"]
        if n > 1:
            low, high = s["ci95"]
            lines.append(
                f"{labels[name]}: VOC07 mAP {s['mean']:.3f}, sd {s['sd']:.3f} over {n} seeds "
                f"(95% interval {low:.3f} to {high:.3f})"
            )
            continue
        spread = (calibrated or {}).get(name)
        beside = (
            f"; calibrated seed spread: mean {spread['mean']:.3f}, sd {spread['sd']:.3f} over "
            f"{spread['n']} seeds"
            if spread
            else ""
        )
        lines.append(
            f"{labels[name]}: VOC07 mAP {s['mean']:.3f} (seed {block['seeds'][0]}{beside})"
        )
    if n == 1:
        lines.append(
            "one training seed: accuracy is one draw and ranks nothing (bench.seeds: 5 gives each "
            "mAP's spread and the differences that exceed it)"
        )
        return lines
    for diff in block["differences"].values():
        a, b = labels[diff["a"]], labels[diff["b"]]
        low, high = diff["ci95"]
        interval = f"paired over {n} seeds, 95% interval {low:+.3f} to {high:+.3f}"
        if diff["distinguishable"]:
            better, worse = (a, b) if diff["mean"] > 0 else (b, a)
            lines.append(
                f"{better} is more accurate than {worse}: {abs(diff['mean']):.3f} mAP ({interval})"
            )
        else:
            lines.append(
                f"{a} and {b} are not distinguishable on this data: difference "
                f"{diff['mean']:+.3f} mAP ({interval})"
            )
    return lines
