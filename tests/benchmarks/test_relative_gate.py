"""The relative gate (benchmarks/gate/relative.py) on synthetic results: what each slowdown or accuracy
change does to the verdicts, worked out by hand; the reference file; the load sampler's arithmetic;
the import root that runs a reference checkout's code."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import pytest
from rcnn_bench.benchmarks.gate.compare import failing
from rcnn_bench.benchmarks.gate.relative import (
    gate,
    gate_metrics,
    import_root,
    read_reference,
    relative_rows,
    run_folders,
    set_aside_times,
)
from rcnn_bench.benchmarks.machine.env import LoadSampler
from rcnn_bench.benchmarks.reporting.results import ResultsError

TOL = {
    "latency": 0.05,
    "latency_variant": 0.15,
    "latency_canary": 0.06,
    "train_s": 0.2,
    "speedup_inference": 0.07,
    "speedup_train": 0.2,
}
IDS = [f"im{i}" for i in range(6)]


def results(ms: dict[str, list[float]], maps: dict[str, float], search=None, canary=None) -> dict:
    """A results.json's gated fields: per pipeline its per-image ms, its mAP, training seconds 10;
    the drift canary's per-image ms where given."""
    pipes = {
        name: {
            "inference": {"samples_ms": list(v)},
            "train": {"total_s": 10.0},
            "map": {"voc07": maps[name], "voc07_strict": maps[name] / 2, "coco": {"ap": 0.3}},
            "variants": {},
        }
        for name, v in ms.items()
    }
    speedup = {
        f"{n}/r": {"inference": {"paired": {"geomean": _geomean(ms["r"], ms[n])}}, "train": 1.0}
        for n in ms
        if n != "r"
    }
    return {
        "timing": {"image_ids": IDS, "load": {"busy": False}, "canary_ms": canary},
        "proposals": {"timed_ms": search or [100.0 + i for i in range(6)]},
        "pipelines": pipes,
        "speedup": speedup,
    }


def _geomean(a: list[float], b: list[float]) -> float:
    prod = 1.0
    for x, y in zip(a, b, strict=True):
        prod *= x / y
    return prod ** (1 / len(a))


BASE = {"r": [100.0, 120, 90, 110, 105, 95], "f": [10.0, 12, 9, 11, 10.5, 9.5]}
MAPS = {"r": 0.8, "f": 0.7}


def _verdicts(a_runs, b_runs) -> dict[str, str]:
    return {r["metric"]: r["verdict"] for r in relative_rows(a_runs, b_runs, TOL)}


def test_identical_sides_pass():
    a = [results(BASE, MAPS)] * 2
    rows = relative_rows(a, copy.deepcopy(a), TOL)
    assert {r["verdict"] for r in rows} == {"same"}
    assert failing(rows) == []
    names = {r["metric"] for r in rows}
    assert {"latency[r]", "latency[f]", "latency[selective_search]", "train_s[r]"} <= names
    assert {
        "map[f]",
        "ap70[f]",
        "coco_ap[f]",
        "speedup_inference[f/r]",
        "speedup_train[f/r]",
    } <= names


def test_every_pipeline_slower_by_one_factor_fails_on_own_latency():
    slow = {n: [1.1 * v for v in ms] for n, ms in BASE.items()}
    v = _verdicts([results(BASE, MAPS)], [results(slow, MAPS)])
    assert v["latency[r]"] == v["latency[f]"] == "worse"
    assert v["speedup_inference[f/r]"] == "same"  # the ratio cancels it: own latency catches it


def test_one_pipeline_slower_fails_its_latency_and_its_speedup():
    slow = {"r": BASE["r"], "f": [1.1 * v for v in BASE["f"]]}
    v = _verdicts([results(BASE, MAPS)], [results(slow, MAPS)])
    assert v["latency[f]"] == "worse" and v["latency[r]"] == "same"
    assert v["speedup_inference[f/r]"] == "worse"  # 1/1.1 = 0.909 < 0.93


def test_selective_search_slower_fails():
    slow = [1.2 * (100.0 + i) for i in range(6)]
    v = _verdicts([results(BASE, MAPS)], [results(BASE, MAPS, search=slow)])
    assert v["latency[selective_search]"] == "worse"
    assert [k for k, x in v.items() if x != "same"] == ["latency[selective_search]"]


def test_the_canary_row_is_the_pipelines_geometric_mean_over_the_canary():
    # Image im0: R-CNN 100 ms, Fast R-CNN 10 ms, canary 2 ms: sqrt(100 * 10) / 2 = 15.811...
    canary = [2.0, 4.0, 2.0, 2.0, 2.0, 2.0]
    metrics = gate_metrics(results(BASE, MAPS, canary=canary))
    kind, values = metrics["latency[pipelines/canary]"]
    assert kind == "latency_canary"
    assert values["im0"] == pytest.approx(1000**0.5 / 2)
    assert values["im1"] == pytest.approx((120 * 12) ** 0.5 / 4)
    assert "latency[pipelines/canary]" not in gate_metrics(results(BASE, MAPS))


def test_a_uniform_slowdown_on_a_drifting_machine_fails_only_over_the_canary():
    # Three rounds a side. The machine's speed moves every round by up to 12% (the pipelines and the
    # canary alike), so each pipeline's rounds overlap; B also slows both pipelines by 10%, which the
    # canary does not share: B's rounds over the canary are all 1.10 and A's 1.00.
    def side(speeds, slow):
        return [
            results(
                {n: [slow * s * v for v in ms] for n, ms in BASE.items()},
                MAPS,
                canary=[2.0 * s] * 6,
            )
            for s in speeds
        ]

    a, b = side((1.0, 1.12, 0.95), 1.0), side((0.9, 1.0, 1.05), 1.1)
    v = _verdicts(a, b)
    assert v["latency[pipelines/canary]"] == "worse"  # 1.10 > 1.06, rounds apart
    # own latency: per image B's median 1.1 x 1.0 over A's 1.0: beyond 5%, but rounds
    # (B 0.99, 1.10, 1.155 of A against A 0.95-1.12) overlap
    assert v["latency[r]"] == v["latency[f]"] == "same"
    assert v["speedup_inference[f/r]"] == "same"
    a_again = side((0.9, 1.0, 1.05), 1.0)
    assert _verdicts(a, a_again)["latency[pipelines/canary]"] == "same"  # drift alone


def test_latency_is_the_median_over_rounds_per_image_then_over_images():
    # Per image: A's rounds 100, 104 and 98 (median 100), B's 110 and 111: ratio 1.10 -> worse, as
    # every round of B (1.10, 1.11 of A) lies beyond every round of A (0.98-1.04).
    a = [results({"r": [t] * 6, "f": [10.0] * 6}, MAPS) for t in (100.0, 104.0, 98.0)]
    b = [results({"r": [t] * 6, "f": [10.0] * 6}, MAPS) for t in (110.0, 111.0)]
    row = next(r for r in relative_rows(a, b, TOL) if r["metric"] == "latency[r]")
    assert row["a"] == pytest.approx(100.0) and row["b"] == pytest.approx(110.5)
    assert row["verdict"] == "worse"  # 1.105 > 1.05


def test_time_rows_fail_only_where_the_rounds_lie_apart():
    # Shaped like an A/A gate of 2026-12-07 (one variant pass, three rounds a side, each round at
    # these shares): the per-image medians put B 6% above A (1.025 / 0.967), beyond a 5% band, but
    # the rounds overlap (A 0.93-1.03, B 0.96-1.21): same, and the row says why.
    def rounds(shares):
        return [results({"r": [100.0 * x] * 6, "f": [10.0] * 6}, MAPS) for x in shares]

    a, b = rounds((1.033, 0.929, 0.967)), rounds((0.962, 1.025, 1.214))
    row = next(r for r in relative_rows(a, b, TOL) if r["metric"] == "latency[r]")
    assert row["verdict"] == "same" and "overlap" in row["why"]
    # An outlier round of A overlaps a real 10% slowdown too: reported, not failed.
    row = next(
        r
        for r in relative_rows(rounds((1.0, 4.0, 1.0)), rounds((1.1,)), TOL)
        if r["metric"] == "latency[r]"
    )
    assert row["verdict"] == "same" and "overlap" in row["why"]

    # Training seconds at a 20% band: 13.5-14.5 against 10-11 lie apart and 14 > 10.5 x 1.2: worse;
    # 12-13 lie apart but 12.5 < 12.6: same; 13.5-14.5 against 10, 10.5, 14 overlap: same.
    def trained(seconds):
        out = []
        for t in seconds:
            r = results(BASE, MAPS)
            r["pipelines"]["f"]["train"]["total_s"] = t
            out.append(r)
        return out

    verdicts = {
        r["metric"]: r["verdict"]
        for r in relative_rows(trained((10, 10.5, 11)), trained((13.5, 14, 14.5)), TOL)
    }
    assert verdicts["train_s[f]"] == "worse"
    rows = relative_rows(trained((10, 10.5, 11)), trained((12, 12.5, 13)), TOL)
    assert next(r for r in rows if r["metric"] == "train_s[f]")["verdict"] == "same"
    rows = relative_rows(trained((10, 10.5, 14)), trained((13.5, 14, 14.5)), TOL)  # overlap
    row = next(r for r in rows if r["metric"] == "train_s[f]")
    assert row["verdict"] == "same" and "overlap" in row["why"]


def test_a_variant_pass_is_gated_at_its_own_tolerance():
    # The same 10% slowdown of a variant's pass and of a main pass: the main pass's 5% calls it
    # worse, the variant's 15% (its passes are noisier, NOTES.md) does not; 20% is worse for both.
    def with_variant(factor: float) -> dict:
        r = results({n: [factor * v for v in ms] for n, ms in BASE.items()}, MAPS)
        r["pipelines"]["f"]["variants"]["svd"] = {
            "samples_ms": [factor * v for v in BASE["f"]],
            "map": {"voc07": 0.6},
        }
        return r

    for factor, variant_verdict in ((1.1, "same"), (1.2, "worse")):
        v = _verdicts([with_variant(1.0)], [with_variant(factor)])
        assert v["latency[f]"] == "worse"
        assert v["latency[f/svd]"] == variant_verdict


def test_a_busy_machine_sets_times_aside_but_not_accuracy():
    slow = {n: [1.1 * v for v in ms] for n, ms in BASE.items()}
    rows = relative_rows([results(BASE, MAPS)], [results(slow, {**MAPS, "f": 0.69})], TOL)
    set_aside_times(rows)
    v = {r["metric"]: r["verdict"] for r in rows}
    assert v["latency[r]"] == v["latency[f]"] == "not gated"
    assert failing(rows) == ["map[f]", "ap70[f]"]  # ap70 is half the mAP here


def test_accuracy_is_exact_both_ways_and_rounds_must_agree():
    lower, higher = {**MAPS, "f": 0.69}, {**MAPS, "f": 0.71}
    assert _verdicts([results(BASE, MAPS)], [results(BASE, lower)])["map[f]"] == "worse"
    rows = relative_rows([results(BASE, MAPS)], [results(BASE, higher)], TOL)
    assert {r["metric"]: r["verdict"] for r in rows}["map[f]"] == "better"
    assert failing(rows) == []  # a rise is reported, not a failure
    unstable = [results(BASE, MAPS), results(BASE, lower)]
    rows = relative_rows(unstable, [results(BASE, MAPS)], TOL)
    assert {r["metric"]: r["verdict"] for r in rows}["map[f]"] == "unstable"
    assert "map[f]" in failing(rows)


def test_a_pipeline_in_one_side_only_fails_unless_declared():
    three = {**BASE, "s": [20.0] * 6}
    rows = relative_rows([results(BASE, MAPS)], [results(three, {**MAPS, "s": 0.5})], TOL)
    new = [r["metric"] for r in rows if r["verdict"] == "new"]
    assert "latency[s]" in new and "map[s]" in new and "speedup_inference[s/r]" in new
    assert set(failing(rows)) == set(new)
    assert failing(rows, allow_new=True) == []
    rows = relative_rows([results(three, {**MAPS, "s": 0.5})], [results(BASE, MAPS)], TOL)
    assert "map[s]" in [r["metric"] for r in rows if r["verdict"] == "missing"]


def test_gate_from_runs_lists_run_folders_and_refuses_a_non_results_file(tmp_path):
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps({"commit": "HEAD", "rounds": 1, "tolerances": TOL, "history": ""}))
    for side in ("A", "B"):
        folder = tmp_path / side / "20260101-000000-ci-000000"
        folder.mkdir(parents=True)
        (tmp_path / side / "latest").symlink_to(folder.name)
        (folder / "results.json").write_text("{}")
    assert [p.name for p in run_folders(tmp_path / "A")] == ["20260101-000000-ci-000000"]
    with pytest.raises(ResultsError):  # "{}" is no results file: one clear error
        gate("ci.yaml", from_runs=(tmp_path / "A", tmp_path / "B"), reference_file=ref)


def test_reference_file_is_checked(tmp_path):
    path = tmp_path / "reference.json"
    good = {"commit": "abc", "rounds": 2, "tolerances": TOL, "history": "h.jsonl", "note": ""}
    path.write_text(json.dumps(good))
    assert read_reference(path).rounds == 2
    for bad, message in (
        ({**good, "extra": 1}, "unknown key"),
        ({**good, "rounds": 0}, "'rounds'"),
        ({**good, "tolerances": {"latency": 0.05}}, "'tolerances'"),
        ({**good, "tolerances": {**TOL, "latency": 1.5}}, "between 0 and 1"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ResultsError, match=message):
            read_reference(path)


def test_shipped_reference_is_readable():
    ref = read_reference()
    assert ref.rounds >= 1 and len(ref.commit) == 40 and ref.note


def test_load_sampler_keeps_steal_apart_from_other_processes():
    s = LoadSampler()
    # (busy, total, own, steal) ticks: over the interval 400 ticks, 200 busy of which 100 ours,
    # 40 stolen by the hypervisor.
    s._add((100.0, 200.0, 50.0, 10.0), (300.0, 600.0, 150.0, 50.0))
    assert s.other == [pytest.approx(0.25)] and s.steal == [pytest.approx(0.1)]
    summary = s.summary()
    assert summary["samples"] == 1 and summary["steal_share"]["max"] == pytest.approx(0.1)


def test_load_sampler_samples_while_the_block_runs():
    with LoadSampler(interval_s=0.02) as s:
        time.sleep(0.2)
    assert s.summary()["samples"] >= 3
    assert all(0 <= x <= 1 for x in s.other + s.steal)


def test_import_root_runs_the_given_trees_code(tmp_path):
    tree = tmp_path / "tree"
    for name in ("benchmarks", "pipelines", "datasets"):
        (tree / name).mkdir(parents=True)
        (tree / name / "__init__.py").write_text(f"WHERE = {name!r} + ' of the tree'\n")
    root = import_root(tree, tmp_path / "path")
    code = "import rcnn_bench.benchmarks as b, rcnn_bench.datasets as d; print(b.WHERE, d.WHERE)"
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "benchmarks of the tree datasets of the tree", out.stderr
