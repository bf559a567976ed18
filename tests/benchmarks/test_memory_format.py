"""The networks' memory format (``bench.channels_last``): which format a run takes, that the pipelines
are built in it, and that a trained pipeline detects the same objects in either format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.harness.data import load_test_set, load_train_set
from rcnn_bench.benchmarks.harness.pretrain import initial_backbone
from rcnn_bench.benchmarks.harness.run import (
    build_pipelines,
    make_proposals,
    prepare_data,
    prepare_test,
    train_pipelines,
)
from rcnn_bench.pipelines.runtime.timing import StageTimer, channels_last_on
from torch.nn import Conv2d

from tests.benchmarks.test_run import tiny_overrides

CPU = torch.device("cpu")


def test_which_format_a_run_takes_by_hand():
    assert channels_last_on("auto", CPU) is True
    assert channels_last_on("auto", torch.device("cuda")) is False
    assert channels_last_on(True, torch.device("cuda")) is True
    assert channels_last_on(False, CPU) is False
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        channels_last_on("yes", CPU)


def _is_channels_last(det) -> list[bool]:
    """Per convolution the pipeline runs at test time, whether its weight is channels-last (1x1
    kernels left out: their two layouts are the same bytes)."""
    convs = {id(m): m for top in det.test_modules() for m in top.modules() if isinstance(m, Conv2d)}
    return [
        c.weight.is_contiguous(memory_format=torch.channels_last) and not c.weight.is_contiguous()
        for c in convs.values()
        if c.kernel_size != (1, 1)
    ]


@pytest.mark.parametrize("setting, expected", [("auto", True), ("true", True), ("false", False)])
def test_pipelines_are_built_in_the_runs_format(tmp_path, setting, expected):
    cfg = load_config(
        "benchmarks/configs/default.yaml",
        [*tiny_overrides(tmp_path), f"bench.channels_last={setting}"],
    )
    dets = build_pipelines(
        cfg, initial_backbone(cfg.backbone, Path(cfg.cache_dir), CPU)[0], 4, CPU, 0
    )
    assert {name: _is_channels_last(d) for name, d in dets.items()} == {
        "rcnn": [expected] * 5,  # the tiny trunk's five convolutions
        "fast_rcnn": [expected] * 5,
    }


def _matched(a, b) -> None:
    """``a`` and ``b`` hold the same detections up to float rounding: each of ``a``'s ten best has
    a detection of ``b`` of its class within 0.01 pixel and 1e-4 in score (the order of near-equal
    scores may differ; the rest, near the thresholds, may be in one and not the other)."""
    for box, score, label in list(zip(a.boxes, a.scores, a.labels, strict=True))[:10]:
        near = (
            (b.labels == label)
            & ((b.boxes - box).abs().amax(dim=1) < 0.01)
            & ((b.scores - score).abs() < 1e-4)
        )
        assert bool(near.any()), (box.tolist(), float(score), int(label))


def test_trained_pipelines_detect_the_same_in_either_format(tmp_path):
    """Every pipeline trained once in the contiguous format, then run on the test images in it and
    in channels-last (prepare_test): the detections agree to float rounding."""
    cfg = load_config(
        "benchmarks/configs/default.yaml",
        [
            *tiny_overrides(tmp_path),
            "bench.channels_last=false",
            "pipelines=rcnn,fast_rcnn,sppnet,faster_rcnn",
            "pipelines.sppnet.solver.iters=2",
            "pipelines.sppnet.scale=64",
            "pipelines.sppnet.max_size=128",
            "pipelines.faster_rcnn.solver.iters=2",
            "pipelines.faster_rcnn.scale=64",
            "pipelines.faster_rcnn.max_size=128",
        ],
    )
    splits, _, _ = prepare_data(cfg)
    proposals = make_proposals(cfg, splits)
    backbone, _ = initial_backbone(cfg.backbone, Path(cfg.cache_dir), CPU)
    dets = build_pipelines(cfg, backbone, splits.train.num_classes, CPU, 0)
    train_pipelines(dets, load_train_set(splits, proposals), CPU, 0)
    test = load_test_set(splits, proposals, CPU)

    def detect_all():
        return {
            name: [
                d.detect(image, None if d.owns_proposals else boxes, StageTimer(CPU))
                for image, boxes in zip(test.images, test.boxes, strict=True)
            ]
            for name, d in dets.items()
        }

    before = detect_all()
    prepare_test(dets, True)
    # the backbone's convolutions and a pipeline's own (the RPN's)
    assert all(set(_is_channels_last(d)) == {True} for d in dets.values())
    after = detect_all()
    assert sum(len(x.scores) for per_image in before.values() for x in per_image) > 0
    for name in dets:
        for a, b in zip(before[name], after[name], strict=True):
            _matched(a, b)
            _matched(b, a)
