from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from rcnn_bench.benchmarks.cli import main
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.gate.relative import gate_metrics
from rcnn_bench.benchmarks.harness import inference
from rcnn_bench.benchmarks.harness.data import (
    TestSet as SplitInMemory,
)  # not a test class for pytest
from rcnn_bench.benchmarks.harness.data import load_splits
from rcnn_bench.benchmarks.harness.inference import (
    TimingPlan,
    alone_times,
    sweep_boxes,
    time_pass,
)
from rcnn_bench.benchmarks.harness.run import run, time_variants, weights_sha1
from rcnn_bench.benchmarks.reporting.results import ResultsError, read_results, validate
from rcnn_bench.pipelines.context import BuildContext
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.parts import proposals
from rcnn_bench.pipelines.parts.backbones import PretrainConfig, build_backbone, load_weights
from rcnn_bench.pipelines.parts.detections import Detections


def tiny_overrides(tmp_path):
    return [
        f"data.root={tmp_path / 'data'}",
        "data.synthetic={seed: 2, train_images: 5, test_images: 4, min_size: [64, 80], max_size: [72, 96]}",
        f"cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'reports'}",
        "proposal_workers=1",
        "backbone.pretrain={iters: 2, images: 10, batch_size: 8}",  # the path, not the weights
        "proposals.resize_max_side=64",
        "proposals.max_proposals=30",
        "pipelines.rcnn.solver.iters=2",
        "pipelines.rcnn.batch_size=16",
        "pipelines.rcnn.variants=[no_bbox_reg, softmax]",  # the tests' own, not the default's
        "pipelines.fast_rcnn.solver.iters=2",
        "pipelines.fast_rcnn.scale=64",
        "pipelines.fast_rcnn.max_size=128",
        "pipelines.fast_rcnn.svd_ranks=[[16, 8]]",
        "pipelines.fast_rcnn.variants=[svm, svd_16_8]",
        "bench.warmup_images=1",
        "bench.sweep_proposals=[5, 40]",
        "bench.sweep_images=1",
        "bench.bootstrap_samples=100",
        "pipelines=rcnn,fast_rcnn",  # the harness's tests need two; each pipeline has its own tests
    ]


def test_tiny_end_to_end_run_writes_valid_results(tmp_path):
    variants = "pipelines.rcnn.variants=[softmax, pool5]"
    cfg = load_config("benchmarks/configs/default.yaml", [*tiny_overrides(tmp_path), variants])
    run_dir = run(cfg, "benchmarks/configs/default.yaml")
    results = read_results(run_dir)
    assert (tmp_path / "reports" / "latest").resolve() == run_dir.resolve()
    assert results["dataset"]["train_images"] == 5 and results["timing"]["timed_images"] == 3
    # Every pipeline started from the pre-trained weights the run cached (the first run trains them).
    pretrained = results["backbone"]["pretrain"]
    assert pretrained["cached"] is False and pretrained["iters"] == 2
    initial = build_backbone(dataclasses.replace(cfg.backbone, pretrain=PretrainConfig()))
    load_weights(initial, pretrained["file"])
    assert results["backbone"]["init_weights_sha1"] == weights_sha1(initial)
    assert weights_sha1(initial) != weights_sha1(
        build_backbone(cfg.backbone)
    )  # not the random ones
    proposal_ms = 1000 * results["proposals"]["seconds_per_image"]
    for name in ("rcnn", "fast_rcnn"):
        rec = results["pipelines"][name]
        samples = rec["inference"]["samples_ms"]
        assert len(samples) == 3 and rec["inference"]["ms_per_image"]["median"] == np.median(
            samples
        )
        end_to_end = rec["inference"]["end_to_end_ms_per_image"]
        assert end_to_end == pytest.approx(np.median(samples) + proposal_ms)
        per_class = [c["voc07"] for c in rec["map"]["per_class"].values() if c["voc07"] is not None]
        assert rec["map"]["voc07"] == pytest.approx(np.mean(per_class))
        assert len(results["sweep"]["ms"][name]) == 2
    # Each variant: its own record, timed on the main pass's images; its training apart from the
    # default model's.
    r, f = results["pipelines"]["rcnn"], results["pipelines"]["fast_rcnn"]
    assert set(r["variants"]) == {"softmax", "pool5"} and set(f["variants"]) == {"svm", "svd_16_8"}
    assert set(r["train"]["stages_s"]) == {"finetune", "features", "svm", "bbox_reg"}
    assert r["train"]["total_s"] == sum(r["train"]["stages_s"].values())
    # pool5's SVMs read the layer kept from the default model's extraction: its training holds that
    # extraction's seconds (what it would cost alone), beside its own pass over the kept rows
    assert set(r["train"]["variant_stages_s"]) == {
        "pool5/shared_extraction",
        "pool5/features",
        "pool5/svm",
    }
    assert (
        r["train"]["variant_stages_s"]["pool5/shared_extraction"]
        == (r["train"]["stages_s"]["features"])
    )
    assert set(f["train"]["variant_stages_s"]) == {"svm/features", "svm/svm", "svd_16_8/svd"}
    assert r["variants"]["pool5"]["train_s"] == sum(r["train"]["variant_stages_s"].values())
    assert r["variants"]["softmax"]["train_s"] == 0
    for rec in (r, f):
        for v in rec["variants"].values():
            assert len(v["samples_ms"]) == 3 and v["flops_per_image"] > 0
            assert v["model_bytes"] == 4 * v["params"]  # float32 throughout
    # The cut network and SVMs on pool5 (2048 per class, 4 classes) in place of fc6, fc7, fc7's SVMs
    # and the box regressors.
    fc = 2048 * 256 + 256 + 256 * 256 + 256
    default_head = 256 * 4 + 4 + 4 * 2048 * 4 + 4 * 4 + 4 * 16 + 4 * 4
    assert r["variants"]["pool5"]["params"] == r["params"] - fc - default_head + 2048 * 4 + 4
    s = results["speedup"]["fast_rcnn/rcnn"]
    assert s["train"] == r["train"]["total_s"] / f["train"]["total_s"]
    ratios = np.array(r["inference"]["samples_ms"]) / np.array(f["inference"]["samples_ms"])
    assert s["inference"]["paired"]["geomean"] == pytest.approx(np.exp(np.log(ratios).mean()))
    assert results["timing"]["image_ids"] == ["test_00001", "test_00002", "test_00003"]
    # The drift canary was timed beside each timed image, and the gate reads it.
    assert len(results["timing"]["canary_ms"]) == 3
    together = gate_metrics(results)["latency[pipelines/canary]"][1]
    times = np.array([p["inference"]["samples_ms"] for p in results["pipelines"].values()])
    expected = np.exp(np.log(times).mean(axis=0)) / np.array(results["timing"]["canary_ms"])
    assert list(together.values()) == pytest.approx(expected.tolist())
    history = (tmp_path / "reports" / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["run_id"] == run_dir.name
    # The proposals were cached: reading them again computes nothing and leaves the file untouched.
    cached = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 2
    mtimes = [p.stat().st_mtime_ns for p in cached]
    splits = load_splits(cfg.data)
    at_cap = {}
    with mock.patch.object(proposals, "compute", side_effect=AssertionError("recomputed")):
        for ds in (splits.train, splits.test):
            props, was_cached = proposals.load_or_compute(ds, cfg.proposals, cfg.cache_dir)
            assert was_cached
            # The cache holds the capped boxes (at most 30 per image): an image reached the cap
            # when it kept exactly 30, whether the cap cut it or selective search found 30.
            counts = [len(b) for b in props.boxes]
            assert max(counts) <= 30
            at_cap[ds.split] = sum(n == 30 for n in counts)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    assert any(at_cap.values())  # the tiny case reaches the cap (4 of 5 and 4 of 4 images here)
    assert results["proposals"]["images_at_cap"] == at_cap


def test_results_validation_names_the_missing_field(tmp_path):
    with pytest.raises(ResultsError, match="missing field schema_version"):
        validate({})
    bad = tmp_path / "results.json"
    bad.write_text("{")
    with pytest.raises(ResultsError, match=re.escape("results.json: not valid JSON")):
        read_results(bad)


def test_sweep_pads_with_jittered_copies_inside_the_image():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 30, 20]], np.float32)
    np.testing.assert_array_equal(sweep_boxes(boxes, 1, (40, 40), 0), boxes[:1])
    out = sweep_boxes(boxes, 50, (40, 40), 0)
    np.testing.assert_array_equal(out[:2], boxes)
    # Each padded box is a copy of one of the two, every coordinate moved by at most 10% of that
    # box's width or height, then clipped to the 40x40 image with a side of at least 1.
    rng = np.random.default_rng(0)
    src = boxes[rng.integers(0, 2, size=48)]
    wh = src[:, 2:] - src[:, :2]
    moved = src + np.concatenate((wh, wh), axis=1) * rng.uniform(-0.1, 0.1, size=src.shape)
    moved = np.clip(moved, 0, 40)
    moved[:, 2:] = np.maximum(moved[:, 2:], moved[:, :2] + 1)
    np.testing.assert_allclose(out[2:], moved.astype(np.float32))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["run", "--set", "pipelines.rcnn.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("rcnn-bench: error:")
        and "unknown key 'pipelines.rcnn.nope'" in err
        and "\n" not in err
    )
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "a.json: results or baseline file is missing" in capsys.readouterr().err


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


def test_stage_costs_count_the_fc_layers_by_hand():
    import torch
    from rcnn_bench.benchmarks.harness.inference import count_costs
    from rcnn_bench.pipelines.fast_rcnn import FastRCNN, FastRCNNConfig

    from tests.conftest import build_context

    det = FastRCNN(FastRCNNConfig(scale=64, max_size=96), build_context(3))
    det.net.eval()
    image = torch.randint(0, 255, (64, 80, 3), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0, 40, 40], [10, 10, 60, 50], [20, 5, 79, 63]])
    costs = count_costs(det, image, boxes, torch.device("cpu"))
    # fc6 (128 x 4 x 4 -> 256) and fc7 (256 -> 256) on 3 RoIs, 2 FLOPs per multiply-add.
    assert costs["stage_flops"]["fc"] == 2 * 3 * (2048 * 256 + 256 * 256)
    # The classifier: 256 -> 4 (3 classes and background) on 3 RoIs.
    assert costs["stage_flops"]["classifier"] == 2 * 3 * 256 * 4
    assert costs["flops"] == sum(costs["stage_flops"].values())
    # Bytes: fc reads its input (3 x 2048 floats) and weights at least once.
    assert costs["stage_bytes"]["fc"] >= 4 * (3 * 2048 + 2048 * 256 + 256 * 256)


@dataclass(frozen=True)
class _RecorderConfig:
    variants: tuple[str, ...] = ("all",)


class _Recorder(Detector):
    """Records which image (its first pixel's value) each detection ran on, and in which variant."""

    name = "recorder"
    config_class = _RecorderConfig
    owns_proposals = True
    variants = ("a", "b")

    def __init__(self, cfg: _RecorderConfig):
        super().__init__(cfg, BuildContext(2, torch.device("cpu"), lambda: None, Path(".")))
        self.seen: list[tuple[str | None, int]] = []

    def fit(self, data, timer) -> dict:
        return {}

    def _detect(self, image, proposals, timer, variant) -> Detections:
        self.seen.append((variant, int(image[0, 0, 0])))
        return Detections.empty()

    def paper_schedule(self, stages_s) -> dict:
        return {}


def test_variants_are_timed_on_the_main_passes_images():
    test = SplitInMemory(
        [torch.full((4, 4, 3), i, dtype=torch.uint8) for i in range(6)], [], [None] * 6
    )
    plan = TimingPlan(warmup=(0,), timed=(1, 2, 3), repeats=2)
    det = _Recorder(_RecorderConfig(variants=("b",)))
    main = time_pass({"recorder": det}, test, lambda name, i: None, plan, torch.device("cpu"))
    passes = time_variants({"recorder": det}, test, plan, torch.device("cpu"))
    assert set(passes["recorder"]) == {"b"}
    # The same warm-up, then every image in order, each timed one twice (repeats 2).
    order = [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]
    assert [i for v, i in det.seen if v is None] == order
    assert [i for v, i in det.seen if v == "b"] == order
    assert len(passes["recorder"]["b"].samples_ms) == len(main["recorder"].samples_ms) == 3
    with pytest.raises(ValueError, match=r"pipelines.recorder.variants: 'c' is not a variant"):
        _Recorder(_RecorderConfig(variants=("c",)))


def test_variant_passes_are_not_warmed_again():
    """The main pass warms each timed image; the variant passes, after it, do not."""
    test = SplitInMemory(
        [torch.full((4, 4, 3), i, dtype=torch.uint8) for i in range(4)], [], [None] * 4
    )
    plan = TimingPlan(warmup=(0,), timed=(1, 2), repeats=1, warm_each=True)
    det = _Recorder(_RecorderConfig(variants=("b",)))
    time_pass({"recorder": det}, test, lambda name, i: None, plan, torch.device("cpu"))
    time_variants({"recorder": det}, test, plan, torch.device("cpu"))
    assert [i for v, i in det.seen if v is None] == [0, 0, 1, 1, 2, 2, 3]
    assert [i for v, i in det.seen if v == "b"] == [0, 0, 1, 2, 3]


class _GroupRecorder(_Recorder):
    """A recorder whose two variants run in one group: a shared "conv" stage, then each its own
    "classifier"."""

    def variant_groups(self, variants):
        return [tuple(variants)]

    def _detect_group(self, image, proposals, shared, timers):
        with shared.stage("conv"):
            self.seen.append((tuple(timers), int(image[0, 0, 0])))
        for timer in timers.values():
            with timer.stage("classifier"):
                pass
        return {v: Detections.empty() for v in timers}


def test_each_variant_of_a_group_is_timed_as_if_alone():
    # By hand: a 100 ms group call with a 60 ms shared stage; a's own stage took 10 ms, b's 25 ms.
    shared = {"conv": 0.060}
    own = {"a": {"classifier": 0.010}, "b": {"classifier": 0.020, "nms": 0.005}}
    alone = alone_times(0.100, shared, own)
    assert alone["a"][0] == pytest.approx(75.0) and alone["b"][0] == pytest.approx(90.0)
    assert alone["a"][1] == pytest.approx({"conv": 60.0, "classifier": 10.0})
    assert alone["b"][1] == pytest.approx({"conv": 60.0, "classifier": 20.0, "nms": 5.0})
    # The harness runs a group in one pass: one call per image, a result per variant.
    test = SplitInMemory(
        [torch.full((4, 4, 3), i, dtype=torch.uint8) for i in range(3)], [], [None] * 3
    )
    det = _GroupRecorder(_RecorderConfig())
    plan = TimingPlan(warmup=(0,), timed=(1, 2), repeats=1)
    passes = time_variants({"recorder": det}, test, plan, torch.device("cpu"))["recorder"]
    assert det.seen == [(("a", "b"), i) for i in (0, 0, 1, 2)]
    for v in ("a", "b"):
        assert passes[v].shared_pass == ("a", "b") and len(passes[v].samples_ms) == 2
        assert set(passes[v].stages_ms[0]) == {"conv", "classifier"}


def test_each_timed_image_is_warmed_once_and_its_first_time_dropped(monkeypatch):
    test = SplitInMemory(
        [torch.full((4, 4, 3), i, dtype=torch.uint8) for i in range(3)], [], [None] * 3
    )
    # Per call: the image and a scripted time. Image 1 is timed: an untimed first run (100 ms,
    # a new input size's costs) and three timed ones (5, 7, 6 ms): median 6.
    times = iter([50.0, 100.0, 5.0, 7.0, 6.0, 40.0])
    seen = []

    def fake(det, image, boxes, device, variant, precision):
        seen.append(int(image[0, 0, 0]))
        return Detections.empty(), next(times), {"conv": 1.0}

    monkeypatch.setattr(inference, "_timed_detect", fake)
    det = _Recorder(_RecorderConfig())
    plan = TimingPlan(warmup=(), timed=(1,), repeats=3, warm_each=True)
    out = time_pass({"recorder": det}, test, lambda name, i: None, plan, torch.device("cpu"))
    assert seen == [0, 1, 1, 1, 1, 2]
    assert out["recorder"].samples_ms == [6.0]
    # Without the warm run the first run's 100 ms is one of the three: median 7.
    times = iter([50.0, 100.0, 5.0, 7.0, 40.0])
    cold = TimingPlan(warmup=(), timed=(1,), repeats=3)
    out = time_pass({"recorder": det}, test, lambda name, i: None, cold, torch.device("cpu"))
    assert out["recorder"].samples_ms == [7.0]
