"""The regression gate proves itself end to end: an injected 40% slowdown of one pipeline fails `compare`
and an A/A pair of runs passes it; a baseline derived from runs holds the tolerances worked out by hand.

The slowdown is far above the gate's resolution on purpose. This test times real runs on whatever
machine runs it, and a shared VM swings: on CI's machine (2026-12-06) one of four consecutive runs of
one process ran both pipelines 23% faster than the runs beside it, with no load and no steal to see,
and a 10% slowdown moved the paired speedup by 6.3% instead of 9.1%. What the gate resolves on a given
machine is measured by `rcnn-bench calibrate` and by A/A runs (benchmarks/NOTES.md), not by a test;
the gate's verdict rules themselves are tested on fixed numbers in test_relative_gate.py and
test_compare_report.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.gate.calibrate import baseline_from_runs
from rcnn_bench.benchmarks.gate.compare import HOST_DRIFT, compare, host_drift, load_side
from rcnn_bench.benchmarks.harness.run import run
from rcnn_bench.benchmarks.reporting.results import read_results
from rcnn_bench.pipelines.fast_rcnn import FastRCNN

from tests.benchmarks.test_run import tiny_overrides


def _overrides(tmp_path, name):
    data = "{seed: 2, train_images: 5, test_images: 13, min_size: [64, 80], max_size: [72, 96]}"
    return [
        *tiny_overrides(tmp_path),
        f"data.synthetic={data}",
        f"output_dir={tmp_path / name}",
        "bench.repeats=5",
        "threads=1",  # no thread oversubscription if something else runs beside the tests
        # Fast R-CNN at ~24 ms per image rather than the tiny config's ~4.5 ms: at 4.5 ms its
        # median moved up to 11% between two runs of one process with R-CNN's moving 1-4%
        # (measured, 2026-11-26), which the speedup's 7% cannot absorb; at 24 ms the two move
        # together and their ratio held within 0.6%.
        "pipelines.fast_rcnn.scale=256",
        "pipelines.fast_rcnn.max_size=384",
    ]


# Two runs of one machine are compared at that machine's minimum effect (what `calibrate` measures
# twice its latency_drift). Runs a minute apart in one process moved both pipelines' median latency
# by up to 5% together here and by 23% on CI's machine (the drift the paired speedups cancel); the
# A/A pair must pass whatever the host does, so its latency rows get twice that.
MIN_EFFECT = 0.5
SLOWDOWN = 1.4  # the paired speedup drops by 1 - 1/1.4 = 29%, four times its 7% tolerance


def slower(factor: float):
    """A wrapper for a ``_detect`` method that spins until it has taken ``factor`` times as long."""

    def wrap(method):
        def slow(self, *args, **kwargs):
            start = time.perf_counter()
            out = method(self, *args, **kwargs)
            until = start + factor * (time.perf_counter() - start)
            while time.perf_counter() < until:
                pass
            return out

        return slow

    return wrap


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    # The first run in a process pays one-time costs the later ones do not (measured here: R-CNN's
    # median 59.7 ms in the first run, 43.3 ms in the third); runs compared in CI are each a fresh
    # process and pay them alike. So the three compared runs come after a run that is not compared.
    run(load_config("benchmarks/configs/ci.yaml", _overrides(tmp, "first")))
    a = run(load_config("benchmarks/configs/ci.yaml", _overrides(tmp, "a")))
    patch = pytest.MonkeyPatch()
    patch.setattr(FastRCNN, "_detect", slower(SLOWDOWN)(FastRCNN._detect))
    try:
        b = run(load_config("benchmarks/configs/ci.yaml", _overrides(tmp, "b")))
    finally:
        patch.undo()
    c = run(load_config("benchmarks/configs/ci.yaml", _overrides(tmp, "c")))
    return a, b, c


def _skip_if_busy(*runs):
    if any(read_results(r)["timing"]["load"]["busy"] for r in runs):
        pytest.skip("other processes were busy while these runs were timed: times are not figures")


def test_a_slowdown_of_one_pipeline_fails(runs, capsys):
    a, b, _ = runs
    _skip_if_busy(a, b)
    assert compare(a, b, min_effect=MIN_EFFECT) == 1
    out = capsys.readouterr().out
    failed = out.split("regression in")[-1]
    # The paired speedup catches it (it moves 29% against 7%); R-CNN, untouched, is not blamed.
    assert "speedup_inference[fast_rcnn/rcnn]" in failed
    assert "latency_ms[rcnn]" not in failed


def test_an_a_a_pair_passes(runs, capsys):
    a, _, c = runs
    _skip_if_busy(a, c)
    # On CI's machine (2026-12-07) run C ran R-CNN 24% and Fast R-CNN 30% faster than run A, a
    # minute apart, same code: the paired speedup moved 7.2% against its 7%. An A/A pair on a host
    # that changed speed under it says nothing about the gate; `compare` names such a move.
    drift = host_drift(load_side(a), load_side(c))
    if drift is not None and abs(drift - 1) > HOST_DRIFT:
        pytest.skip(f"the host's speed moved x{drift:.3f} between two runs of the same code")
    assert compare(a, c, min_effect=MIN_EFFECT) == 0, capsys.readouterr().out


def test_a_baseline_from_runs_already_made(runs, tmp_path):
    """`calibrate --from-runs`: tolerances and latency drift of existing runs, worked out here."""
    folders = [Path(r) for r in runs]
    out = tmp_path / "baseline.json"
    written = baseline_from_runs(folders, out, "benchmarks/configs/ci.yaml")["baseline"]
    results = [read_results(f) for f in folders]
    for pair in results[0]["speedup"]:
        values = [
            (r["speedup"][pair]["inference"].get("paired") or {}).get("geomean")
            or r["speedup"][pair]["inference"]["value"]
            for r in results
        ]
        mean = sum(values) / len(values)
        deviation = max(abs(v - mean) for v in values) / mean
        metric = written["metrics"][f"speedup_inference[{pair}]"]
        assert metric["tolerance"] == pytest.approx(max(0.07, 2 * deviation))
        assert metric["value"] == pytest.approx(mean)
    for name in results[0]["pipelines"]:
        ms = [
            dict(
                zip(
                    r["timing"]["image_ids"],
                    r["pipelines"][name]["inference"]["samples_ms"],
                    strict=True,
                )
            )
            for r in results
        ]
        worst = 0.0
        for i in range(len(ms)):
            for j in range(i + 1, len(ms)):
                median = float(np.median([ms[j][k] / ms[i][k] for k in ms[i]]))
                worst = max(worst, abs(median - 1), abs(1 / median - 1))
        assert written["latency_drift"][name] == pytest.approx(worst)
    assert json.loads(out.read_text())["metrics"] == written["metrics"]
