from __future__ import annotations

from collections import Counter
from unittest import mock

import numpy as np
import pytest
import torch
from rcnn_bench.datasets.voc import VOCDataset
from rcnn_bench.pipelines import fast_rcnn
from rcnn_bench.pipelines.fast_rcnn import (
    FastRCNN,
    FastRCNNConfig,
    svd_variant,
    training_entries,
)
from rcnn_bench.pipelines.parts.boxes import flip_boxes
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.parts.sampling import match
from rcnn_bench.pipelines.parts.scoring import ScoreBudget
from rcnn_bench.pipelines.parts.svm import SVMConfig
from rcnn_bench.pipelines.parts.svm_head import SVMHead, SVMStageConfig
from rcnn_bench.pipelines.parts.training import SolverConfig
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch.testing import assert_close

from tests.conftest import build_context
from tests.pipelines.helpers import jittered_proposals, sgd_steps


def test_flips_keep_boxes_inside_the_image():
    gen = torch.Generator().manual_seed(0)
    w = 97
    x1y1 = torch.rand(200, 2, generator=gen) * 80
    boxes = torch.cat((x1y1, x1y1 + 1 + torch.rand(200, 2, generator=gen) * 16), 1)
    flipped = flip_boxes(boxes, w)
    assert (flipped[:, 0] >= 0).all() and (flipped[:, 2] <= w).all()
    assert (flipped[:, 2] > flipped[:, 0]).all()
    assert_close(flip_boxes(flipped, w), boxes)


def test_sampled_targets_follow_the_flip(tiny_voc):
    from rcnn_bench.datasets.voc import VOCDataset
    from rcnn_bench.pipelines.parts.sampling import with_ground_truth

    ds = VOCDataset(tiny_voc[0], "trainval")
    det = FastRCNN(FastRCNNConfig(), build_context(4))
    ann = ds.annotations[0]
    gt = torch.from_numpy(ann.boxes)
    rois = with_ground_truth(gt + 1.0, gt)
    m = match(rois, gt, torch.from_numpy(ann.labels), 0.5)
    w = ann.size[1]
    labels, boxes, targets = det._sample(rois, gt, m, torch.Generator().manual_seed(0), True, w)
    fg = labels > 0
    assert fg.any() and (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w + 1).all()
    # Flipping mirrors dx and keeps the other deltas.
    _, _, targets_nf = det._sample(rois, gt, m, torch.Generator().manual_seed(0), False, w)
    assert_close(targets[fg][:, 0], -targets_nf[fg][:, 0])
    assert_close(targets[fg][:, 1:], targets_nf[fg][:, 1:])


def test_detect_with_zero_proposals_and_tiny_fit(tiny_voc):
    from rcnn_bench.datasets.voc import VOCDataset
    from rcnn_bench.pipelines.parts.proposals import ProposalConfig, load_or_compute

    ds = VOCDataset(tiny_voc[0], "trainval")
    props, _ = load_or_compute(
        ds, ProposalConfig(resize_max_side=64, max_proposals=40), tiny_voc[0] / "cache"
    )
    data = TrainData([ds.load_image(i) for i in range(len(ds))], ds.annotations, props.boxes, 4)
    cfg = FastRCNNConfig(
        scale=64,
        max_size=128,
        svd_ranks=((8, 8), (16, 4)),
        variants=("svd_8_8",),
        solver=SolverConfig(iters=3),
    )
    det = FastRCNN(cfg, build_context(4))
    assert det.offered_variants(cfg) == ("svm", "svd_8_8", "svd_16_4")
    assert det.enabled_variants() == ("svd_8_8",)
    timer, variant_timer = StageTimer("cpu"), StageTimer("cpu")
    info = det.fit(data, timer)
    assert set(timer.seconds) == {"train"} and np.isfinite(info["final_loss"])
    det.fit_variants(data, variant_timer)  # the variant's SVD is its own stage, not the default's
    assert set(variant_timer.seconds) == {"svd_8_8/svd"} and set(det.svd_heads) == {"svd_8_8"}
    image = torch.from_numpy(ds.load_image(0))
    empty = det.detect(image, torch.zeros((0, 4)), StageTimer("cpu"))
    assert empty.boxes.shape == (0, 4) and empty.labels.dtype == torch.long
    t = StageTimer("cpu")
    d = det.detect(image, torch.from_numpy(props.boxes[0]), t, "svd_8_8")
    assert {"conv", "roi_pool", "fc", "classifier", "bbox_reg", "nms"} <= set(t.seconds)
    h, w = image.shape[:2]
    assert (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
    assert det.paper_schedule(timer.seconds)["paper_iterations"] == 40000


def _tiny_data(tiny_voc, images: int = 4) -> TrainData:
    ds = VOCDataset(tiny_voc[0], "trainval")
    anns = ds.annotations[:images]
    props = jittered_proposals(anns, 4, seed=0)
    # Every object a target, as in the originals: every image then has foreground RoIs.
    return TrainData(
        [ds.load_image(i) for i in range(images)], anns, props, 4, train_difficult=True
    )


def _tiny_cfg(**kw) -> FastRCNNConfig:
    return FastRCNNConfig(
        **{"scale": 64, "max_size": 128, "rois_per_image": 16, "svd_ranks": ((8, 8),), **kw}
    )


def test_frozen_convs_stay_unchanged_and_the_rest_trains(tiny_voc):
    solver = SolverConfig(iters=2, lr=0.01, lr_step=1, bias_lr_mult=2.0, bias_decay=False)
    det = FastRCNN(_tiny_cfg(frozen_convs=2, solver=solver), build_context(4))
    before = {k: v.clone() for k, v in det.net.state_dict().items()}
    with sgd_steps() as steps:
        det.fit(_tiny_data(tiny_voc), StageTimer("cpu"))
    after = det.net.state_dict()
    # The tiny trunk's convolutions are trunk.0, 3, 6, 9, 12: the first two do not move.
    for key in ("trunk.0.weight", "trunk.0.bias", "trunk.3.weight", "trunk.3.bias"):
        assert torch.equal(after[key], before[key]), key
    for key in ("trunk.6.weight", "trunk.12.bias", "head.0.weight", "head.2.bias"):
        assert not torch.equal(after[key], before[key]), key
    frozen = {id(p) for i in (0, 3) for p in det.net.trunk[i].parameters()}
    new = {id(p) for layer in (det.cls_score, det.bbox_pred) for p in layer.parameters()}
    trained = set().union(*(g["params"] for g in steps[0]))
    assert trained == ({id(p) for p in det.net.parameters()} - frozen) | new
    # Weights at 1x with decay, biases at 2x without; the new layers at 1x too; a step at iteration 1.
    for k, step in enumerate(steps):
        for g in step:
            bias = g["weight_decay"] == 0
            assert g["lr_mult"] == (2.0 if bias else 1.0)
            assert g["lr"] == pytest.approx(0.01 * 0.1**k * g["lr_mult"])


def test_frozen_convs_the_trunk_lacks_fail_when_built():
    with pytest.raises(ValueError, match="frozen_convs: 6 asked for, but the trunk has 5"):
        FastRCNN(_tiny_cfg(frozen_convs=6), build_context(4))


def test_append_visits_every_image_and_its_mirror_once_per_epoch(tiny_voc):
    assert training_entries([0, 2, 5], "append") == [0, 1, 4, 5, 10, 11]
    assert (
        training_entries([0, 2, 5], "random") == training_entries([0, 2, 5], "none") == [0, 4, 10]
    )
    data = _tiny_data(tiny_voc)
    n = len(data.images)
    seen = []
    real_prepare = fast_rcnn.prepare_image

    def spy(image, scale, max_size, flip=False):
        i = next(k for k in range(n) if image.data_ptr() == data.images[k].ctypes.data)
        seen.append((i, flip))
        return real_prepare(image, scale, max_size, flip)

    # n iterations of 2 images: one epoch of the doubled set, then one more.
    det = FastRCNN(_tiny_cfg(solver=SolverConfig(iters=n + 1)), build_context(4))
    with mock.patch.object(fast_rcnn, "prepare_image", side_effect=spy):
        det.fit(data, StageTimer("cpu"))
    assert Counter(seen[: 2 * n]) == Counter((i, f) for i in range(n) for f in (False, True))
    again = FastRCNN(_tiny_cfg(solver=SolverConfig(iters=n + 1)), build_context(4))
    first, seen[:] = list(seen), []
    with mock.patch.object(fast_rcnn, "prepare_image", side_effect=spy):
        again.fit(data, StageTimer("cpu"))
    assert seen == first  # the same seed, the same order


def test_adaptive_detect_keeps_at_most_max_per_image_per_class(tiny_voc):
    data = _tiny_data(tiny_voc, images=1)
    det = FastRCNN(_tiny_cfg(max_per_image=1), build_context(4))
    image, proposals = torch.from_numpy(data.images[0]), torch.from_numpy(data.proposals[0])
    d = det.detect(image, proposals, StageTimer("cpu"))
    assert sorted(d.labels.tolist()) == [1, 2, 3, 4]  # untrained: every class scores some RoI
    assert isinstance(det.test_budget(), ScoreBudget)


def test_model_size_counts_what_each_variant_runs():
    from rcnn_bench.pipelines.parts.svd import compress_head

    det = FastRCNN(FastRCNNConfig(svd_ranks=((16, 8),)), build_context(3))
    det.svd_heads["svd_16_8"] = compress_head(det.net.head, (16, 8))
    det.svms = SVMHead(torch.zeros(256, 3), torch.zeros(3), 1.0, 1.0, None)
    full = det.model_size()["params"]
    # fc6 2048 -> 256 and fc7 256 -> 256 become 2048 -> 16 -> 256 and 256 -> 8 -> 256 (one bias each).
    head = 2048 * 256 + 256 + 256 * 256 + 256
    svd = 2048 * 16 + 16 * 256 + 256 + 256 * 8 + 8 * 256 + 256
    assert det.model_size("svd_16_8")["params"] == full - head + svd
    assert det.model_size()["bytes"] == 4 * full
    # The "svm" variant: 3 SVMs on fc7 (256) in place of cls_score (256 -> 4).
    assert det.model_size("svm")["params"] == full - (256 * 4 + 4) + (256 * 3 + 3)


def test_svd_ranks_name_the_variants_and_bad_ones_fail():
    assert svd_variant((1024, 256)) == "svd_1024_256"
    with pytest.raises(ValueError, match="svd_ranks must be >= 1"):
        FastRCNNConfig(svd_ranks=((0, 8),))
    with pytest.raises(ValueError, match="svd_ranks lists a pair twice"):
        FastRCNNConfig(svd_ranks=((8, 8), (8, 8)))
    with pytest.raises(
        ValueError, match=r"pipelines.fast_rcnn.variants: 'svd_8_8' is not a variant"
    ):
        FastRCNN(FastRCNNConfig(svd_ranks=((16, 8),), variants=("svd_8_8",)), build_context(3))


def test_svm_variant_trains_post_hoc_svms_on_fc7_with_rcnn_stage(tiny_voc, tmp_path):
    data = _tiny_data(tiny_voc, images=3)
    cfg = _tiny_cfg(solver=SolverConfig(iters=2), variants=("svm",), svm=SVMConfig(retrain_limit=5))
    det = FastRCNN(cfg, build_context(4, tmp_path))
    det.fit(data, StageTimer("cpu"))
    timer = StageTimer("cpu")
    info = det.fit_variants(data, timer)
    assert set(timer.seconds) == {"svm/features", "svm/svm"}  # no box regressors: the net's deltas
    assert det.svms.weight.shape == (256, 4) and det.svms.regressors is None
    # Every RoI and every object (all are targets here) of the 3 images.
    regions = sum(
        len(p) + len(a.labels) for p, a in zip(data.proposals, data.annotations, strict=True)
    )
    assert info["svm"]["feature_cache_regions"] == regions
    assert not list(tmp_path.glob("fast_rcnn_svm-features-*"))  # the cache is removed
    image, proposals = torch.from_numpy(data.images[0]), torch.from_numpy(data.proposals[0])
    d = det.detect(image, proposals, StageTimer("cpu"), "svm")
    # Each detection scores what the SVM of its class gives fc7 of one of the RoIs.
    fc7 = det._fc7_of(data)(0, proposals)[0]
    scores = (fc7 * det.svms.fc7_scale) @ det.svms.weight + det.svms.bias  # (R, K)
    assert len(d.scores)
    for score, label in zip(d.scores, d.labels, strict=True):
        assert (scores[:, label - 1] - score).abs().min() < 1e-4


def test_svm_variant_stage_settings_are_rcnn_defaults_with_this_blocks_solver():
    from rcnn_bench.pipelines.rcnn import RCNNConfig

    # The "svm" variant trains as R-CNN's SVM stage does by default; its solver is this block's.
    stage, rcnn = SVMStageConfig(), RCNNConfig()
    for key in ("feature_norm", "svm_neg_iou", "bbox_lambda", "bbox_min_iou", "features"):
        assert getattr(stage, key) == getattr(rcnn, key), key
    assert stage.keep_feature_cache is rcnn.keep_feature_cache is False
    assert stage.svm == rcnn.svm
