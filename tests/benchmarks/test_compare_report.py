"""Regression check and report rendering on a results.json built by a tiny real run (once per module)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.gate.compare import (
    Side,
    check,
    compare,
    host_drift,
    read_baseline,
    write_baseline,
)
from rcnn_bench.benchmarks.gate.relative import record_history
from rcnn_bench.benchmarks.harness.run import run
from rcnn_bench.benchmarks.reporting import report, tables
from rcnn_bench.benchmarks.reporting.report import render
from rcnn_bench.benchmarks.reporting.results import ResultsError, write_json

from tests.benchmarks.test_run import tiny_overrides


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = load_config("benchmarks/configs/default.yaml", tiny_overrides(tmp))
    return run(cfg, "benchmarks/configs/default.yaml")


def worse(results: dict, factor: float) -> dict:
    """A copy whose R-CNN looks ``factor`` times faster: Fast R-CNN's speedup shrinks."""
    r = copy.deepcopy(results)
    for s in (
        r["speedup"]["fast_rcnn/rcnn"]["inference"],
        r["speedup"]["fast_rcnn/rcnn"]["inference"]["paired"],
    ):
        key = "value" if "value" in s else "geomean"
        s[key] /= factor
        s["ci95"] = [v / factor for v in s["ci95"]]
    return r


def test_compare_passes_on_its_own_run_and_fails_on_a_slower_one(tiny_run, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    write_baseline([tiny_run], baseline)
    assert compare(baseline, tiny_run) == 0
    assert "no regression" in capsys.readouterr().out
    results = json.loads((tiny_run / "results.json").read_text())
    bad = tmp_path / "worse.json"
    write_json(bad, worse(results, 5.0))
    assert compare(baseline, bad) == 1
    out = capsys.readouterr().out
    assert "WORSE" in out
    assert "speedup_inference[fast_rcnn/rcnn]" in out.split("regression in")[-1]
    assert compare(baseline, bad, markdown=True) == 1
    assert "| speedup_inference[fast_rcnn/rcnn] |" in capsys.readouterr().out


def test_another_machines_baseline_gates_nothing_absolute(tiny_run, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    written = write_baseline([tiny_run], baseline)
    results = json.loads((tiny_run / "results.json").read_text())
    assert written["fingerprint"] == results["env"]["fingerprint"]
    bad = tmp_path / "worse.json"
    write_json(bad, worse(results, 5.0))
    assert compare(baseline, bad) == 1  # this machine's baseline gates
    capsys.readouterr()
    written["fingerprint"] = {**written["fingerprint"], "id": "another"}
    write_json(baseline, written)
    assert compare(baseline, bad) == 0
    out = capsys.readouterr().out
    assert "nothing absolute is gated" in out and "rcnn-bench gate" in out
    assert "WORSE" not in out and "not gated (worse)" in out
    del written["fingerprint"]  # a baseline from before fingerprints: no machine known
    write_json(baseline, written)
    assert compare(baseline, bad) == 0


def test_a_metric_in_one_side_only_fails_unless_declared(tiny_run, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    written = write_baseline([tiny_run], baseline)
    written["metrics"]["map[gone]"] = {"value": 0.5, "tolerance": 0.01}
    del written["metrics"]["map[rcnn]"]
    write_json(baseline, written)
    assert compare(baseline, tiny_run) == 1
    out = capsys.readouterr().out
    assert "regression in map[gone], map[rcnn]" in out and "NEW (not in A)" in out
    assert compare(baseline, tiny_run, allow_new=True) == 0


def test_recorded_ci_history_feeds_the_reports_trend(tiny_run, tmp_path, monkeypatch):
    results = json.loads((tiny_run / "results.json").read_text())
    history = tmp_path / f"{results['config']['name']}-history.jsonl"
    earlier = {**results, "run_id": "20000101-000000-default-aaaaaa"}
    record_history(history, earlier, "abc123", "the reference moved: why")
    line = json.loads(history.read_text())
    assert line["reference"] == "abc123" and line["note"] == "the reference moved: why"
    assert line["fingerprint"] == results["env"]["fingerprint"]
    monkeypatch.setattr(report, "BASELINES", tmp_path)
    trend = report._history(tiny_run.parent / "history.jsonl", [results])
    assert [h["run_id"] for h in trend] == [earlier["run_id"], results["run_id"]]


def test_baseline_is_the_mean_of_several_runs(tiny_run, tmp_path):
    results = json.loads((tiny_run / "results.json").read_text())
    other = copy.deepcopy(results)
    other["run_id"] += "-b"
    train = results["speedup"]["fast_rcnn/rcnn"]["train"]
    other["speedup"]["fast_rcnn/rcnn"]["train"] = train + 1.0
    path = tmp_path / "other.json"
    write_json(path, other)
    data = write_baseline([tiny_run, path], tmp_path / "b.json")
    m = data["metrics"]["speedup_train[fast_rcnn/rcnn]"]
    assert m["value"] == pytest.approx(train + 0.5)
    assert m["spread"] == [train, train + 1.0]
    assert data["source_runs"] == [results["run_id"], other["run_id"]]


def _side(metrics: dict, kind: str = "baseline") -> Side:
    return Side("x", kind, metrics, "default")


def test_speedup_gate_is_two_sided_and_map_one_sided():
    base = _side({"speedup_inference[f/r]": {"value": 10.0, "tolerance": 0.05}})
    for value, verdict in ((9.4, "worse"), (9.6, "same"), (10.4, "same"), (10.6, "changed")):
        run = _side({"speedup_inference[f/r]": {"value": value, "ci95": None}}, "run")
        assert check(base, run)[0]["verdict"] == verdict, value
    base = _side({"map[rcnn]": {"value": 0.6, "tolerance": 0.05}})
    for value, verdict in ((0.54, "worse"), (0.56, "same"), (0.7, "better")):
        run = _side({"map[rcnn]": {"value": value, "ci95": None}}, "run")
        assert check(base, run)[0]["verdict"] == verdict, value


def test_host_drift_by_hand():
    """Median per-image ratio of each pipeline, then their geometric mean."""
    images = [f"i{k}" for k in range(5)]

    def times(values):
        return dict(zip(images, values, strict=True))

    a = {"r": times([10, 20, 30, 40, 50]), "f": times([1, 2, 3, 4, 5])}
    # R-CNN's ratios 0.5, 0.75, 0.8, 0.9, 1.0: median 0.8; Fast R-CNN's all 1.25
    b = {"r": times([5, 15, 24, 36, 50]), "f": times([1.25, 2.5, 3.75, 5, 6.25])}
    machine = ("cpu", 2, 1)
    side_a = Side("a", "run", {}, "ci", machine, a)
    side_b = Side("b", "run", {}, "ci", machine, b)
    assert host_drift(side_a, side_b) == pytest.approx((0.8 * 1.25) ** 0.5)
    assert host_drift(side_a, Side("b", "run", {}, "ci", ("other", 2, 1), b)) is None
    b["f"].pop("i0")  # other images: not paired
    assert host_drift(side_a, side_b) is None


def test_bad_baseline_files(tmp_path):
    path = tmp_path / "b.json"
    path.write_text('{"metrics": {"speedup_train": {"value": 2}}}')
    with pytest.raises(
        ResultsError,
        match=re.escape("b.json: metric 'speedup_train' needs 'value' and 'tolerance'"),
    ):
        read_baseline(path)
    path.write_text("[]")
    with pytest.raises(ResultsError, match="not a baseline file"):
        read_baseline(path)
    path.write_text('{"metrics": {}}')
    with pytest.raises(ResultsError, match="not a baseline"):
        read_baseline(path)


def test_shipped_baselines_are_readable():
    for path in (Path(__file__).resolve().parents[2] / "benchmarks" / "baselines").glob("*.json"):
        if path.name != "reference.json":  # the relative gate's (test_relative_gate.py)
            assert read_baseline(path)["metrics"]


def test_report_has_every_section(tiny_run, tmp_path):
    html_path, md_path = tiny_run / "report.html", tiny_run / "report.md"
    assert html_path.is_file() and md_path.is_file()  # written by the run itself
    html, md = html_path.read_text(), md_path.read_text()
    titles = (
        "Where the end-to-end time goes",
        "Inference time by stage",
        "Latency distribution",
        "proposals per image",
        "Per-class AP",
        "Per-class AP across training seeds",
        "Training loss and learning rate, every seed",
        "Accuracy over training seeds",
        "one training seed: accuracy is one draw and ranks nothing",
        "Precision-recall",
        "Detections on test images",
        "beside the papers",
        "Speedups over R-CNN",
        "Environment",
        "Config",
    )
    for title in titles:
        assert title in html and title in md, title
    assert html.count("data:image/png;base64,") >= 6 and 'src="figures/' not in html
    for line in md.splitlines():
        if line.startswith("!["):
            assert (tiny_run / line.split("(")[1].rstrip(")")).is_file()
    # Several runs: the trend appears.
    second = tmp_path / "second"
    shutil.copytree(tiny_run, second)
    data = json.loads((second / "results.json").read_text())
    data["run_id"] += "-b"
    write_json(second / "results.json", data)
    html2, _ = render([tiny_run, second], tmp_path / "out")
    assert "Trend across runs" in html2.read_text()


@pytest.mark.browser
def test_report_renders_in_a_real_browser(tiny_run, tmp_path):
    if not shutil.which("chromium"):
        if os.environ.get("RCNN_BENCH_REQUIRE_BROWSER"):
            pytest.fail(
                "chromium is required (RCNN_BENCH_REQUIRE_BROWSER is set) but not installed"
            )
        pytest.skip("Debian's chromium is not installed")
    html = tiny_run / "report.html"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        ["chromium", *flags, "--virtual-time-budget=5000", "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    marker = dom.split('data-figures-loaded="')[1].split('"')[0]
    loaded, total = (int(v) for v in marker.split("/"))
    assert total >= 6 and loaded == total
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", *flags, "--window-size=1200,2400", f"--screenshot={shot}", html.as_uri()],
        capture_output=True,
        timeout=120,
    )
    from matplotlib import image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels[..., :3].std() > 0.05  # not a blank page


def test_schema_1_results_are_read_and_reported(tiny_run, tmp_path):
    """A results.json as schema 1 wrote it (two fixed pipelines, one speedup) is upgraded on read."""
    v2 = json.loads((tiny_run / "results.json").read_text())
    v1 = copy.deepcopy(v2)
    v1["schema_version"] = 1
    v1["speedup"] = v1["speedup"]["fast_rcnn/rcnn"]
    del v1["baseline"]
    for rec in v1["pipelines"].values():
        del rec["label"]
    old = tmp_path / "old"
    old.mkdir()
    write_json(old / "results.json", v1)
    html, _ = render([old], old)
    assert "Fast R-CNN over R-CNN" in html.read_text()
    baseline = tmp_path / "b.json"
    write_baseline([tiny_run], baseline)
    assert compare(baseline, old) == 0


def test_pareto_front_by_hand():
    from rcnn_bench.benchmarks.reporting.tables import pareto

    points = [
        {"label": "a", "map": 0.7, "ms": 100.0},  # the most accurate
        {"label": "b", "map": 0.6, "ms": 10.0},  # the fastest
        {"label": "c", "map": 0.6, "ms": 50.0},  # as accurate as b, slower
        {"label": "d", "map": 0.65, "ms": 40.0},  # between a and b
        {"label": "e", "map": 0.5, "ms": 200.0},  # beaten by everything
    ]
    assert pareto(points) == {"a", "b", "d"}


def test_tradeoff_table_has_every_variant_and_the_papers_figures(tiny_run):
    from rcnn_bench.benchmarks.reporting.tables import pipeline_table, tradeoff_table

    results = json.loads((tiny_run / "results.json").read_text())
    table = tradeoff_table(results)
    rcnn, fast = results["pipelines"]["rcnn"], results["pipelines"]["fast_rcnn"]
    assert list(table.index) == [
        "R-CNN",
        "R-CNN: no_bbox_reg",
        "R-CNN: softmax",
        "Fast R-CNN",
        "Fast R-CNN: svm",
        "Fast R-CNN: svd_16_8",
    ]
    assert table.loc["R-CNN: softmax", "paper"].startswith("50.9 (R-CNN paper, appendix B")
    assert table.loc["R-CNN", "paper"].startswith("58.5 (R-CNN paper, Table 2")
    assert table.loc["Fast R-CNN: svm", "paper"].startswith("66.8 (Fast R-CNN paper, Table 8")
    assert (
        table.loc["Fast R-CNN: svd_16_8", "paper"] == ""
    )  # the paper has no figure at these ranks
    softmax = rcnn["variants"]["softmax"]
    assert table.loc["R-CNN: softmax", "params (M)"] == f"{softmax['params'] / 1e6:.3f}"
    assert table.loc["Fast R-CNN: svm", "ms/img"] == (
        f"{fast['variants']['svm']['ms_per_image']['median']:.1f}"
    )
    # Two pipelines with a variant of the same name keep a row each.
    results["pipelines"]["sppnet"] = {**copy.deepcopy(rcnn), "label": "SPPnet"}
    rows = pipeline_table(results).index
    assert "  R-CNN: no_bbox_reg" in rows and "  SPPnet: no_bbox_reg" in rows


def test_end_to_end_groups_by_hand():
    results = {
        "proposals": {"seconds_per_image": 2.0},
        "pipelines": {
            "a": {
                "stage_groups": {"warp": "per_region", "conv": "per_region", "nms": "classifier"},
                "inference": {"stages_ms": {"warp": 1.0, "conv": 30.0, "nms": 2.0, "misc": 0.5}},
            },
            "b": {
                "owns_proposals": True,
                "stage_groups": {"conv": "conv", "rpn": "proposals", "fc": "per_region"},
                "inference": {"stages_ms": {"conv": 5.0, "rpn": 1.5, "fc": 2.0}},
            },
        },
    }
    groups = tables.end_to_end_groups(results)
    # a: selective search 2000 ms, per-region 31, classifier 2, "misc" unnamed -> other.
    assert groups["a"] == {
        "proposals": 2000.0,
        "conv": 0.0,
        "per_region": 31.0,
        "classifier": 2.0,
        "other": 0.5,
    }
    # b makes its own proposals: no selective search; its RPN is its proposals' time.
    assert groups["b"] == {
        "proposals": 1.5,
        "conv": 5.0,
        "per_region": 2.0,
        "classifier": 0.0,
        "other": 0.0,
    }
