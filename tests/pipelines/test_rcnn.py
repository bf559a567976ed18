from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from datasets.voc import VOCDataset
from pipelines.bbox_regression import BoxRegressors
from pipelines.boxes import flip_boxes
from pipelines.detector import ScoreBudget, TrainData
from pipelines.proposals import ProposalConfig, load_or_compute
from pipelines.rcnn import (
    RCNN,
    RCNNConfig,
    SVMHead,
    mirror_regions,
    svm_detections,
    training_regions,
)
from pipelines.svm import SVMConfig
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig
from pipelines.warp import warp_regions
from tests.conftest import build_context
from tests.pipelines.helpers import jittered_proposals, sgd_steps


def test_tiny_fit_records_every_stage_and_detects(tiny_voc, tmp_path):
    ds = VOCDataset(tiny_voc[0], "trainval")
    props, _ = load_or_compute(ds, ProposalConfig(resize_max_side=64, max_proposals=40), tmp_path)
    data = TrainData([ds.load_image(i) for i in range(len(ds))], ds.annotations, props.boxes, 4)
    cfg = RCNNConfig(
        context_pad=4,
        solver=SolverConfig(iters=2, paper_iters=100000),
        batch_size=16,
        svm=SVMConfig(retrain_limit=20),
    )
    det = RCNN(cfg, build_context(4, tmp_path / "cache"))
    timer = StageTimer("cpu")
    info = det.fit(data, timer)
    # The model run at test time: the network, 4 SVMs on fc7 (256) and 4 box regressors on pool5
    # (128 x 4 x 4), with their 4x4 un-whitening and means; the fine-tuning classifier is not in it.
    net = sum(p.numel() for p in det.net.parameters())
    svms, regressors = 256 * 4 + 4, 4 * 2048 * 4 + 4 * 4 + 4 * 16 + 4 * 4
    assert det.model_size()["params"] == net + svms + regressors
    assert det.model_size("no_bbox_reg")["params"] == net + svms
    assert set(timer.seconds) == {"finetune", "features", "svm", "bbox_reg"}
    regions = sum(len(p) for p in props.boxes) + sum(
        int((~a.difficult).sum()) for a in ds.annotations
    )
    assert info["feature_cache_regions"] == regions
    # fc7 of every region and pool5 (128 x 4 x 4) of every box-regression example, float16, plus
    # the two .npy headers of 128 bytes.
    examples = sum(info["bbox_examples"])
    assert info["feature_cache_bytes"] == 2 * 128 + regions * 256 * 2 + examples * 2048 * 2
    assert not list((tmp_path / "cache").glob("rcnn-features-*"))  # removed after training
    assert any(s["rounds"] >= 2 for s in info["svm"])
    image = torch.from_numpy(ds.load_image(1))
    empty = det.detect(image, torch.zeros((0, 4)), StageTimer("cpu"))
    assert empty.boxes.shape == (0, 4)
    t = StageTimer("cpu")
    d = det.detect(image, torch.from_numpy(props.boxes[1]), t)
    assert {"preprocess", "warp", "conv", "fc", "classifier", "bbox_reg", "nms"} <= set(t.seconds)
    proposals = torch.from_numpy(props.boxes[1])
    plain = det.detect(image, proposals, StageTimer("cpu"), "no_bbox_reg")
    for box in plain.boxes:  # without regression every detection is one of the proposals
        assert (proposals == box).all(dim=1).any()
    assert np.isfinite(d.scores.numpy()).all()
    sched = det.paper_schedule({"finetune": 2.0, "features": 1.0, "svm": 1.0, "bbox_reg": 0.0})
    assert sched["hours"] == (2.0 * 100000 / 2 + 2.0) / 3600


def test_mirroring_flips_the_warped_region_exactly():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(3, 30, 40, generator=gen)
    boxes = torch.tensor([[2.0, 3, 20, 25], [10, 0, 39, 17], [0, 5, 12, 30], [5, 5, 30, 28]])
    regions = warp_regions(image, boxes, 16, 2)
    flipped = torch.tensor([True, False, False, True])
    out = mirror_regions(regions, flipped)
    for k in range(4):
        assert torch.equal(out[k], regions[k].flip(2) if flipped[k] else regions[k])
    # A mirrored region is the region of the mirrored box in the mirrored image, as when Caffe mirrors
    # the window it cropped (to float rounding of the sample positions).
    mirrored = warp_regions(image.flip(2), flip_boxes(boxes, 40), 16, 2)
    assert_close(regions.flip(3), mirrored, atol=1e-4, rtol=0)


def _tiny_data(tiny_voc, images: int = 3) -> TrainData:
    ds = VOCDataset(tiny_voc[0], "trainval")
    anns = ds.annotations[:images]
    props = jittered_proposals(anns, 4, seed=0)
    # Every object a target, as in the originals: every image then has foreground RoIs.
    return TrainData(
        [ds.load_image(i) for i in range(images)], anns, props, 4, train_difficult=True
    )


def test_finetuning_groups_multipliers_and_step(tiny_voc, tmp_path):
    lr = 0.01
    solver = SolverConfig(iters=2, lr=lr, lr_step=1, bias_lr_mult=2.0, bias_decay=False)
    cfg = RCNNConfig(context_pad=4, solver=solver, batch_size=8, cls_lr_mult=10.0)
    det = RCNN(cfg, build_context(4, tmp_path))
    data = _tiny_data(tiny_voc)
    rois, _, matches = training_regions(data, cfg.fg_iou)
    with sgd_steps() as steps:
        det._finetune(data, rois, matches)
    net_w = {id(p) for p in det.net.parameters() if p.ndim > 1}
    net_b = {id(p) for p in det.net.parameters() if p.ndim == 1}
    cls_w, cls_b = {id(det.cls.weight)}, {id(det.cls.bias)}
    # Every layer trains (nothing frozen); biases 2x without decay; the new classifier 10x (bias 20x);
    # the second iteration at a tenth of the first's rate.
    want = [(net_w, 1.0, 5e-4), (net_b, 2.0, 0.0), (cls_w, 10.0, 5e-4), (cls_b, 20.0, 0.0)]
    for k, step in enumerate(steps):
        got = [(g["params"], g["lr_mult"], g["weight_decay"]) for g in step]
        assert got == want
        assert [g["lr"] for g in step] == pytest.approx([lr * 0.1**k * m for _, m, _ in want])
    assert len(steps) == 2


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
    args = (fc7, torch.zeros(3, 1), boxes, head, RCNNConfig(), (60, 60), StageTimer("cpu"))
    fixed = svm_detections(*args)
    assert fixed.scores.tolist() == [2.0, 0.5, 0.25, -1.0]
    budget = ScoreBudget(k, max_per_image=1, max_per_set=None)
    adaptive = svm_detections(*args, budget=budget)
    assert adaptive.scores.tolist() == [2.0, 0.25] and adaptive.labels.tolist() == [1, 2]
    assert torch.equal(adaptive.boxes, boxes[[1, 2]])
