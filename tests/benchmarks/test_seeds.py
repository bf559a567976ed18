"""Accuracy over training seeds (bench.seeds): the ranking rule by hand, and a run whose further seeds
train what a run of that seed alone trains."""

from __future__ import annotations

import json

import pytest
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.evaluation.seeds import ranking_lines, read_seed_spread, summarize_seeds
from rcnn_bench.benchmarks.harness.run import run
from rcnn_bench.benchmarks.reporting.results import read_results

from tests.benchmarks.test_run import tiny_overrides

LABELS = {"a": "A", "b": "B", "c": "C"}


def _runs(maps: dict[str, list[float]]) -> dict[str, list[dict]]:
    return {
        name: [
            {"seed": s, "voc07": m, "per_class": {"x": m}, "curves": []}
            for s, m in enumerate(values)
        ]
        for name, values in maps.items()
    }


def test_only_differences_whose_interval_excludes_zero_are_ranked():
    # b - a: 0.05 0.03 0.04 (mean 0.04, sd 0.01, t(0.975, 2) 4.302653: 0.0152 to 0.0648): ranked;
    # c - a: 0.05 -0.03 0.01 (mean 0.01, sd 0.04: -0.0894 to 0.1094): not
    block = summarize_seeds(
        _runs({"a": [0.75, 0.75, 0.75], "b": [0.80, 0.78, 0.79], "c": [0.80, 0.72, 0.76]})
    )
    assert block["seeds"] == [0, 1, 2] and block["pipelines"]["a"]["voc07"]["sd"] == 0.0
    assert block["differences"]["a-b"]["mean"] == pytest.approx(-0.04)
    lines = ranking_lines(block, LABELS)
    assert lines[1] == "B: VOC07 mAP 0.790, sd 0.010 over 3 seeds (95% interval 0.765 to 0.815)"
    assert "B is more accurate than A: 0.040 mAP (paired over 3 seeds, 95% interval" in lines[3]
    assert lines[4].startswith("A and C are not distinguishable on this data: difference -0.010")
    assert lines[5].startswith("B and C are not distinguishable")


def test_one_seed_ranks_nothing_and_shows_the_calibrated_spread(tmp_path):
    block = summarize_seeds(_runs({"a": [0.70], "b": [0.90]}))
    spread = {"a": {"n": 5, "mean": 0.72, "sd": 0.031, "ci95": [0.68, 0.76], "values": []}}
    baseline = tmp_path / "b.json"
    baseline.write_text(
        json.dumps({"seed_spread": {"seeds": [0, 1, 2, 3, 4], "pipelines": spread}})
    )
    block["calibrated"] = read_seed_spread(str(baseline))
    lines = ranking_lines(block, LABELS)
    assert lines[0] == (
        "A: VOC07 mAP 0.700 (seed 0; calibrated seed spread: mean 0.720, sd 0.031 over 5 seeds)"
    )
    assert lines[1] == "B: VOC07 mAP 0.900 (seed 0)"
    assert lines[2].startswith("one training seed") and len(lines) == 3
    assert not block["differences"]["a-b"]["distinguishable"]
    (tmp_path / "none.json").write_text("{}")
    for bad in (tmp_path / "none.json", tmp_path / "missing.json"):
        with pytest.raises(ValueError, match=r"bench\.seed_spread"):
            read_seed_spread(str(bad))


def test_a_further_seed_trains_what_that_seed_alone_trains(tmp_path):
    def go(name, *extra):
        overrides = [
            *tiny_overrides(tmp_path),
            "pipelines.fast_rcnn.variants=[]",
            f"output_dir={tmp_path / name}",
            *extra,
        ]
        return read_results(run(load_config("benchmarks/configs/ci.yaml", overrides)))

    both = go("both", "bench.seeds=[0, 5]")
    alone = go("alone", "seed=5")
    block = both["seeds"]
    assert block["seeds"] == [0, 5] and alone["seeds"]["seeds"] == [5]
    for name in ("rcnn", "fast_rcnn"):
        first, second = block["pipelines"][name]["runs"]
        assert first["voc07"] == both["pipelines"][name]["map"]["voc07"]
        only = alone["seeds"]["pipelines"][name]["runs"][0]
        assert second["voc07"] == only["voc07"] and second["per_class"] == only["per_class"]
        assert second["curves"] == only["curves"] and second["curves"][0]["loss"]
        assert first["curves"] != second["curves"]
        assert block["pipelines"][name]["voc07"]["values"] == [first["voc07"], second["voc07"]]
