from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from rcnn_bench.pipelines.parts.bbox_regression import BoxRegressors
from rcnn_bench.pipelines.parts.scoring import ScoreBudget
from rcnn_bench.pipelines.parts.svm_head import (
    SVMHead,
    SVMStageConfig,
    choose_features,
    svm_detections,
)
from rcnn_bench.pipelines.runtime.timing import StageTimer

# What the test-time steps read (RankSettings), at R-CNN's defaults.
RANKING = SimpleNamespace(score_thresh=-1.1, nms_iou=0.3, max_per_class=100)


def test_choose_features_keeps_the_cache_with_room_to_spare():
    # An fc7 cache of 100 bytes: auto keeps it with 125 bytes free (the 1.25 margin), not with 124.
    assert choose_features("auto", 100, 125) == "disk"
    assert choose_features("auto", 100, 124) == "none"
    assert (
        choose_features("disk", 100, 0) == "disk" and choose_features("none", 100, 10**9) == "none"
    )


def test_svm_scores_through_the_adaptive_budget():
    # Three regions apart from each other, SVM scores equal to fc7 (identity weights): with at most
    # one candidate per class and image, each class keeps its best region; without, every region above
    # -1.1 stays.
    fc7 = torch.tensor([[0.5, -2.0], [2.0, -1.0], [-1.5, 0.25]])
    k = 2
    regressors = BoxRegressors(
        torch.zeros(k, 1, 4),
        torch.zeros(k, 4),
        torch.eye(4).repeat(k, 1, 1),
        torch.zeros(k, 4),
        torch.zeros(k, dtype=torch.bool),
        [0, 0],
    )
    head = SVMHead(torch.eye(k), torch.zeros(k), 1.0, 1.0, regressors)
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    args = (fc7, torch.zeros(3, 1), boxes, head, RANKING, (60, 60), StageTimer("cpu"))
    fixed = svm_detections(*args)
    assert fixed.scores.tolist() == [2.0, 0.5, 0.25, -1.0]
    budget = ScoreBudget(k, max_per_image=1, max_per_set=None)
    adaptive = svm_detections(*args, budget=budget)
    assert adaptive.scores.tolist() == [2.0, 0.25] and adaptive.labels.tolist() == [1, 2]
    assert torch.equal(adaptive.boxes, boxes[[1, 2]])


def test_svm_stage_config_checks_its_feature_strategy():
    assert SVMStageConfig(features="none").features == "none"
    with pytest.raises(ValueError, match="features must be one of"):
        SVMStageConfig(features="ram")
