from __future__ import annotations

import dataclasses

import pytest
import torch
from rcnn_bench.benchmarks.micro.reference import (
    TorchvisionFastRCNN,
    assert_same_detections,
    folded_predictor,
    interleaved_times,
)
from rcnn_bench.pipelines.fast_rcnn import FastRCNN, FastRCNNConfig
from rcnn_bench.pipelines.parts.roi_head import DeltaNorm
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch.testing import assert_close

from tests.conftest import build_context

K = 3
R = 40


def spread_detector(norm: bool, **settings) -> FastRCNN:
    """A tiny random Fast R-CNN whose scores spread (0.01 to about 0.9, where the untrained heads give
    every class 1/4) and whose box deltas are not small, with a per-class target normalisation or the
    fixed bbox_stds."""
    cfg = FastRCNNConfig(scale=96, max_size=160, test_topk="fixed", dedup_boxes=0.0, **settings)
    det = FastRCNN(cfg, build_context(K))
    det.net.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        det.cls_score.weight.normal_(0, 0.1, generator=gen)
        det.bbox_pred.weight.normal_(0, 0.3, generator=gen)
        det.bbox_pred.bias.normal_(0, 0.3, generator=gen)
    if norm:
        det.delta_norm = DeltaNorm(
            torch.randn(K, 4, generator=gen) * 0.1, torch.rand(K, 4, generator=gen) * 0.2 + 0.05
        )
    return det


def image_and_boxes(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 48x64 image (resized exactly 2x at scale 96) and R boxes inside it."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8, generator=gen)
    xy = torch.rand(R, 2, generator=gen) * torch.tensor([48.0, 32.0])
    return image, torch.cat((xy, xy + 4 + torch.rand(R, 2, generator=gen) * 12), dim=1)


@pytest.mark.parametrize("norm", [True, False], ids=["per_class", "fixed_stds"])
@pytest.mark.parametrize("seed", [0, 1])
def test_torchvision_roi_heads_give_our_detections(norm, seed):
    det = spread_detector(norm, max_per_class=R)
    image, boxes = image_and_boxes(seed)
    ours = det.detect(image, boxes, StageTimer())
    theirs = TorchvisionFastRCNN(det)(image, boxes)
    assert 0 < len(ours.scores) < R * K  # the threshold kept some pairs and dropped others
    assert_same_detections(theirs, ours, box_atol=1e-4)


def test_a_binding_per_class_cap_is_where_the_two_part():
    # Ours keeps max_per_class per class; RoIHeads keeps K * max_per_class over all classes.
    det = spread_detector(True, max_per_class=2)
    image, boxes = image_and_boxes(0)
    ours = det.detect(image, boxes, StageTimer())
    theirs = TorchvisionFastRCNN(det)(image, boxes)
    assert torch.bincount(ours.labels, minlength=K + 1)[1:].tolist() == [2, 2, 2]
    assert len(theirs.scores) == 2 * K
    assert torch.bincount(theirs.labels).max() > 2  # the 6 highest, whatever their classes


def test_folded_predictor_by_hand():
    cls_score, bbox_pred = torch.nn.Linear(2, 2), torch.nn.Linear(2, 4)  # one class
    with torch.no_grad():
        bbox_pred.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [2, 0]]))
        bbox_pred.bias.copy_(torch.tensor([0.5, 0, 0, -1]))
    norm = DeltaNorm(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([[2.0, 1, 0.5, 0.1]]))
    predictor, coder = folded_predictor(cls_score, bbox_pred, norm, (0.1, 0.1, 0.2, 0.2))
    logits, deltas = predictor(torch.tensor([[1.0, 3.0]]))
    # bbox_pred gives (1.5, 3, 4, 1): times std plus mean, (4, 5, 5, 4.1); background's 4 are 0.
    assert_close(deltas, torch.tensor([[0.0, 0, 0, 0, 4, 5, 5, 4.1]]))
    assert_close(logits, cls_score(torch.tensor([[1.0, 3.0]])))
    assert coder == (1.0, 1.0, 1.0, 1.0)
    _, fixed = folded_predictor(cls_score, bbox_pred, None, (0.1, 0.1, 0.2, 0.2))
    assert_close(torch.tensor(fixed), torch.tensor([10.0, 10.0, 5.0, 5.0]))


@pytest.mark.parametrize("setting", [{"test_topk": "adaptive"}, {"dedup_boxes": 0.0625}])
def test_settings_roi_heads_lacks_are_refused(setting):
    det = spread_detector(False)
    det.cfg = dataclasses.replace(det.cfg, **setting)
    with pytest.raises(ValueError, match="test_topk 'fixed' and dedup_boxes 0"):
        TorchvisionFastRCNN(det)


def test_interleaved_times_alternate_and_drop_the_warmup():
    calls = []

    def measure(name: str, seconds: float):
        def run() -> float:
            calls.append(name)
            return seconds + len(calls)

        return run

    times = interleaved_times({"a": measure("a", 0.0), "b": measure("b", 100.0)}, rounds=2)
    # The warm-up round in order, then the order reversed every round.
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert times == {"a": [4.0, 5.0], "b": [103.0, 106.0]}
