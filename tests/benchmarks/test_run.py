from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.cli import main
from benchmarks.config import load_config
from benchmarks.inference import sweep_boxes
from benchmarks.results import ResultsError, read_results, validate
from benchmarks.run import run


def tiny_overrides(tmp_path):
    return [
        f"data.root={tmp_path / 'data'}",
        "data.synthetic={seed: 2, train_images: 5, test_images: 4, min_size: [64, 80], max_size: [72, 96]}",
        f"cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'reports'}",
        "proposal_workers=1",
        "proposals.resize_max_side=64",
        "proposals.max_proposals=30",
        "pipelines.rcnn.solver.iters=2",
        "pipelines.rcnn.batch_size=16",
        "pipelines.fast_rcnn.solver.iters=2",
        "pipelines.fast_rcnn.scale=64",
        "pipelines.fast_rcnn.max_size=128",
        "pipelines.fast_rcnn.svd_ranks=[16, 8]",
        "bench.warmup_images=1",
        "bench.sweep_proposals=[5, 40]",
        "bench.sweep_images=1",
        "bench.bootstrap_samples=100",
    ]


def test_tiny_end_to_end_run_writes_valid_results(tmp_path):
    cfg = load_config("benchmarks/configs/default.yaml", tiny_overrides(tmp_path))
    run_dir = run(cfg, "benchmarks/configs/default.yaml")
    results = read_results(run_dir)
    assert (tmp_path / "reports" / "latest").resolve() == run_dir.resolve()
    assert results["dataset"]["train_images"] == 5 and results["timing"]["timed_images"] == 3
    assert len(results["backbone"]["init_weights_sha1"]) == 40
    for name in ("rcnn", "fast_rcnn"):
        rec = results["pipelines"][name]
        assert rec["inference"]["ms_per_image"]["median"] > 0
        assert len(rec["inference"]["samples_ms"]) == 3
        assert rec["inference"]["flops_per_image"] > 0
        assert 0 <= rec["map"]["voc07"] <= 1
        assert len(results["sweep"]["ms"][name]) == 2
    assert results["pipelines"]["rcnn"]["train"]["info"]["feature_cache_bytes"] > 0
    assert set(results["pipelines"]["rcnn"]["variants"]) == {"no_bbox_reg"}
    assert set(results["pipelines"]["fast_rcnn"]["variants"]) == {"svd"}
    lo, hi = results["speedup"]["fast_rcnn/rcnn"]["inference"]["ci95"]
    assert lo <= results["speedup"]["fast_rcnn/rcnn"]["inference"]["value"] <= hi
    history = (tmp_path / "reports" / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["run_id"] == run_dir.name
    # Proposals are cached: a second run reads them back.
    assert list((tmp_path / "cache").glob("*.npz"))


def test_results_validation_names_the_missing_field(tmp_path):
    with pytest.raises(ResultsError, match="missing field schema_version"):
        validate({})
    bad = tmp_path / "results.json"
    bad.write_text("{")
    with pytest.raises(ResultsError, match="results.json: not valid JSON"):
        read_results(bad)


def test_sweep_pads_with_jittered_copies_inside_the_image():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 30, 20]], np.float32)
    assert len(sweep_boxes(boxes, 1, (40, 40), 0)) == 1
    out = sweep_boxes(boxes, 50, (40, 40), 0)
    assert out.shape == (50, 4) and (out >= 0).all() and (out <= 40).all()
    assert ((out[:, 2:] - out[:, :2]) >= 1).all()
    np.testing.assert_array_equal(out[:2], boxes)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["run", "--set", "pipelines.rcnn.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("rcnn-bench: error:")
        and "unknown key 'pipelines.rcnn.nope'" in err
        and "\n" not in err
    )
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "a.json: baseline file is missing" in capsys.readouterr().err


def test_cli_generates_synthetic_data(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "synthetic",
                "--out",
                str(tmp_path / "s"),
                "--seed",
                "4",
                "--train",
                "2",
                "--test",
                "1",
            ]
        )
        == 0
    )
    assert "trainval 2 images" in capsys.readouterr().out
    assert (tmp_path / "s" / "ImageSets" / "Main" / "test.txt").read_text().split() == [
        "test_00000"
    ]
