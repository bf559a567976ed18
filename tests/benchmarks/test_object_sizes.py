from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.harness.data import Splits, object_floors, size_warnings
from rcnn_bench.benchmarks.harness.run import build_pipelines
from rcnn_bench.datasets.voc import Annotation
from rcnn_bench.pipelines.parts.backbones import build_backbone
from rcnn_bench.pipelines.parts.detections import TrainData


@dataclass
class Split:
    """What describe reads of a split: 640 x 480 photographs, cells of 24 px and cars of 100 px."""

    split: str
    annotations: list
    classes: tuple[str, ...] = ("car", "cell")

    def __len__(self):
        return len(self.annotations)


def photo(image_id, boxes, labels):
    boxes = np.asarray(boxes, np.float32)
    return Annotation(image_id, (480, 640), boxes, np.asarray(labels), np.zeros(len(labels), bool))


@pytest.fixture(scope="module")
def detectors():
    # make bench's config: the tiny backbone, the shared-map pipelines at scale 288, longer side <= 480
    cfg = load_config("benchmarks/configs/default.yaml")
    return build_pipelines(cfg, build_backbone(cfg.backbone), 2, torch.device("cpu"), cfg.seed)


def test_floors_follow_each_pipelines_scale(detectors):
    floors = object_floors(detectors)
    # A 640 x 480 image at scale 288, longer side <= 480: factor min(288 / 480, 480 / 640) = 0.6, so
    # one 16-pixel cell is 16 / 0.6 pixels of the photograph; R-CNN warps to the tiny net's 64.
    unit, knob, side = floors["fast_rcnn"]
    assert side((480, 640)) == pytest.approx(16 / 0.6)
    assert knob == "pipelines.fast_rcnn.scale (and .max_size)"
    assert unit == "one 16-pixel conv-map cell at scale 288 (longer side <= 480)"
    # A tall 1000 x 400 image: 288 / 400 = 0.72 would make the longer side 720 > 480: 0.48.
    assert floors["sppnet"][2]((1000, 400)) == pytest.approx(16 / 0.48)
    assert floors["rcnn"][1] is None and floors["rcnn"][2]((480, 640)) == 64.0


def test_a_class_below_one_cell_is_warned_about_once_with_its_knobs(detectors):
    cells = [[10 + 40 * k, 10, 34 + 40 * k, 34] for k in range(4)]  # 24 px < 26.7: below one cell
    test = Split("test", [photo("t1", [*cells, [300, 100, 400, 200]], [2, 2, 2, 2, 1])])
    train = Split("train", [photo("a1", [[0, 0, 1, 40], [300, 100, 400, 200]], [2, 1])])
    lines = size_warnings(Splits(train, test, "voc", Path(".")), object_floors(detectors))
    assert lines[0] == (
        "train: 1 degenerate boxes (at most one pixel wide or tall: a1: cell 1x40) are scored but "
        "not trained on; fix or remove them in the annotations"
    )
    assert len(lines) == 2  # the cars (100 px) are above every floor
    assert lines[1] == (
        "class 'cell': of its test objects, 100% are smaller than one 16-pixel conv-map cell at "
        "scale 288 (longer side <= 480) for fast_rcnn, sppnet, faster_rcnn: those pipelines barely "
        "see them; raise pipelines.fast_rcnn.scale (and .max_size), pipelines.sppnet.scale (and "
        ".max_size), pipelines.faster_rcnn.scale (and .max_size)"
    )


def test_degenerate_boxes_are_not_training_targets():
    ann = photo("a", [[0, 0, 1, 40], [5, 5, 45, 6], [10, 10, 50, 50]], [1, 2, 2])
    data = TrainData([np.zeros((480, 640, 3), np.uint8)], [ann], [np.zeros((0, 4))], 2)
    boxes, labels = data.ground_truth(0)
    assert boxes.tolist() == [[10, 10, 50, 50]] and labels.tolist() == [2]


def test_rcnn_warps_to_its_warp_size_when_set():
    from rcnn_bench.pipelines.parts.warp import warp_regions
    from rcnn_bench.pipelines.rcnn import RCNNConfig

    cfg = load_config(
        "benchmarks/configs/default.yaml",
        ["pipelines=rcnn", "bench.baseline=rcnn", "pipelines.rcnn.warp_size=48"],
    )
    (rcnn,) = build_pipelines(
        cfg, build_backbone(cfg.backbone), 2, torch.device("cpu"), cfg.seed
    ).values()
    assert rcnn.warp_size == 48 and rcnn.net.input_size == 64  # the backbone keeps its own input
    assert object_floors({"rcnn": rcnn})["rcnn"][2]((480, 640)) == 48.0
    image = torch.randn(3, 40, 60)
    boxes = torch.tensor([[0.0, 0.0, 19.0, 9.0], [10.0, 5.0, 59.0, 39.0]])
    regions = rcnn._warp(image, boxes)
    assert regions.shape == (2, 3, 48, 48)
    assert torch.equal(regions, warp_regions(image, boxes, 48, cfg.pipelines["rcnn"].context_pad))
    for bad in (-1, 16):
        with pytest.raises(ValueError, match="warp_size must be 0"):
            RCNNConfig(warp_size=bad)
