"""A third pipeline registered here only: the harness trains, times, scores and reports it with no change
anywhere else (the pipeline registry's promise)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.harness.run import run
from rcnn_bench.benchmarks.reporting.results import read_results
from rcnn_bench.pipelines import registry
from rcnn_bench.pipelines.context import BuildContext, PaperFigures
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.parts.detections import Detections, TrainData
from rcnn_bench.pipelines.runtime.timing import StageTimer

from tests.benchmarks.test_run import tiny_overrides


@dataclass(frozen=True)
class WholeImageConfig:
    score: float = 0.75  # the score of its one detection


class WholeImage(Detector):
    """Calls every image one box, the whole image, of the class most frequent in training."""

    name = "whole_image"
    label = "Whole image"
    config_class = WholeImageConfig
    owns_proposals = True
    variants = ("half_score",)
    train_stages = ("count",)
    paper = PaperFigures("none: a test double", voc07_map=0.0)

    def __init__(self, cfg: WholeImageConfig, context: BuildContext):
        super().__init__(cfg, context)
        self.label_ = 1

    def fit(self, data: TrainData, timer: StageTimer) -> dict:
        with timer.stage("count"):
            counts = Counter(int(c) for ann in data.annotations for c in ann.labels)
            self.label_ = counts.most_common(1)[0][0]
        return {"label": self.label_}

    def _detect(self, image, proposals, timer, variant) -> Detections:
        assert proposals is None  # it owns its proposals: the harness passes none
        with timer.stage("box"):
            h, w = image.shape[:2]
            score = self.cfg.score / (2 if variant == "half_score" else 1)
            return Detections(
                torch.tensor([[0.0, 0.0, float(w), float(h)]]),
                torch.tensor([score]),
                torch.tensor([self.label_]),
            )

    def paper_schedule(self, stages_s: dict[str, float]) -> dict:
        return {"iterations_run": 1, "paper_iterations": 1, "hours": sum(stages_s.values()) / 3600}


@pytest.fixture
def whole_image(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, WholeImage.name, WholeImage)


def test_a_registered_third_pipeline_is_trained_timed_scored_and_reported(whole_image, tmp_path):
    overrides = [*tiny_overrides(tmp_path), "pipelines=rcnn,fast_rcnn,whole_image"]
    cfg = load_config("benchmarks/configs/default.yaml", overrides)
    run_dir = run(cfg)
    results = read_results(run_dir)
    rec = results["pipelines"]["whole_image"]
    train_labels = Counter(int(c) for ann in _annotations(tmp_path, "trainval") for c in ann.labels)
    assert rec["train"]["info"] == {"label": train_labels.most_common(1)[0][0]}
    assert set(rec["train"]["stages_s"]) == {"count"} and set(rec["inference"]["stages_ms"]) == {
        "box"
    }
    assert len(rec["inference"]["samples_ms"]) == results["timing"]["timed_images"] == 3
    # It owns its proposals: no selective-search time in its end-to-end figure, and FLOP-free.
    median = rec["inference"]["ms_per_image"]["median"]
    assert rec["inference"]["end_to_end_ms_per_image"] == median
    assert rec["inference"]["flops_per_image"] == 0
    # One detection per test image, all of the trained class: hand-counted per class.
    n_test = results["dataset"]["test_images"]
    label = rec["train"]["info"]["label"]
    classes = results["dataset"]["classes"]
    for k, name in enumerate(classes, start=1):
        assert rec["map"]["per_class"][name]["num_det"] == (n_test if k == label else 0)
    assert set(rec["variants"]) == {"half_score"}
    assert results["speedup"]["whole_image/rcnn"]["candidate"] == "whole_image"
    assert len(results["sweep"]["ms"]["whole_image"]) == 2
    html = (run_dir / "report.html").read_text()
    assert "Whole image" in html and "Whole image over R-CNN" in html


def test_pipelines_that_own_their_proposals_never_compute_shared_ones(whole_image, tmp_path):
    overrides = [
        *tiny_overrides(tmp_path),
        "pipelines=whole_image",
        "bench.baseline=whole_image",
    ]
    results = read_results(run(load_config("benchmarks/configs/default.yaml", overrides)))
    assert list(results["pipelines"]) == ["whole_image"] and results["speedup"] == {}
    assert not list((tmp_path / "cache").glob("*.npz"))
    assert re.match("none", results["proposals"]["method"])


def _annotations(tmp_path, split):
    from rcnn_bench.datasets.voc import VOCDataset

    return VOCDataset(tmp_path / "data", split).annotations
