from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from rcnn_bench.datasets.voc import VOCDataset
from rcnn_bench.pipelines.faster_rcnn import FasterRCNN, FasterRCNNConfig, build_rpn, propose
from rcnn_bench.pipelines.originals import render
from rcnn_bench.pipelines.parts.backbones import BackboneConfig, build_backbone, trunk_convs
from rcnn_bench.pipelines.parts.boxes import box_iou
from rcnn_bench.pipelines.parts.conv_map import prepare_image
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.parts.training import SolverConfig
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import Tensor, nn
from torch.testing import assert_close

from tests.conftest import build_context
from tests.pipelines.helpers import sgd_steps

# A 48 x 64 image has a 3 x 4 map at stride 16; two sizes x three ratios make six anchors a position.
SMALL = FasterRCNNConfig(anchor_sizes=(32, 64), aspect_ratios=(0.5, 1.0, 2.0))


def _anchors(cfg: FasterRCNNConfig = SMALL) -> Tensor:
    rpn = build_rpn(cfg, 8)
    batch = torch.zeros(1, 3, 48, 64)
    return propose_anchors(rpn, batch, torch.zeros(1, 8, 3, 4))


def propose_anchors(rpn, batch: Tensor, features: Tensor) -> Tensor:
    from torchvision.models.detection.image_list import ImageList

    sizes = [tuple(batch.shape[2:])]
    return rpn.anchor_generator(ImageList(batch, sizes), [features])[0]


def test_anchors_of_a_hand_made_map():
    anchors = _anchors()
    assert anchors.shape == (3 * 4 * 6, 4)
    # Centred on (0, 0), ratio = height / width, in torchvision's order (ratio-major, then size):
    # ratio 0.5, side 32: w = 32 * sqrt(2) = 45.25, h = 22.63 -> half sides rounded 23, 11; and so on.
    first = torch.tensor(
        [
            [-23.0, -11, 23, 11],  # ratio 0.5, side 32
            [-45, -23, 45, 23],  # ratio 0.5, side 64
            [-16, -16, 16, 16],  # ratio 1, side 32
            [-32, -32, 32, 32],  # ratio 1, side 64
            [-11, -23, 11, 23],  # ratio 2, side 32
            [-23, -45, 23, 45],  # ratio 2, side 64
        ]
    )
    assert_close(anchors[:6], first)
    assert_close(anchors[6:12], first + torch.tensor([16.0, 0, 16, 0]))  # next column: x + 16
    assert_close(anchors[24:30], first + torch.tensor([0.0, 16, 0, 16]))  # next row: y + 16
    assert_close(anchors[-6:], first + torch.tensor([48.0, 32, 48, 32]))  # row 2, column 3


def test_objectness_targets_of_a_box_equal_to_an_anchor():
    rpn = build_rpn(SMALL, 8)
    anchors = _anchors()
    k = (1 * 4 + 2) * 6 + 2  # row 1, column 2, ratio 1, side 32: (16, 0, 48, 32)
    gt = anchors[k : k + 1].clone()
    assert gt.tolist() == [[16.0, 0, 48, 32]]
    labels, matched = rpn.assign_targets_to_anchors([anchors], [{"boxes": gt}])
    labels = labels[0]
    # A plain loop over the anchors: positive at IoU >= 0.7, negative below 0.3, ignored between.
    iou = box_iou(anchors, gt)[:, 0]
    want = torch.tensor([1.0 if v >= 0.7 else 0.0 if v < 0.3 else -1.0 for v in iou.tolist()])
    assert_close(labels, want)
    assert torch.nonzero(labels == 1).flatten().tolist() == [k]  # the only anchor above 0.7
    # Its neighbours one cell left or right overlap it by 16 x 32 of 2048 - 512: a third, ignored.
    assert labels[k - 6] == -1 and labels[k + 6] == -1 and iou[k + 6] == pytest.approx(1 / 3)
    assert_close(matched[0][k], gt[0])


class _FixedHead(nn.Module):
    """An RPN head that returns given objectness and deltas whatever the features."""

    def __init__(self, objectness: Tensor, deltas: Tensor):
        super().__init__()
        self.objectness, self.deltas = objectness, deltas

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        return [self.objectness], [self.deltas]


def test_proposals_of_a_hand_made_head():
    cfg = FasterRCNNConfig(
        anchor_sizes=(32, 64), aspect_ratios=(0.5, 1.0, 2.0), rpn_post_nms_test=2
    )
    rpn = build_rpn(cfg, 8).eval()
    objectness = torch.full((1, 6, 3, 4), -5.0)
    deltas = torch.zeros(1, 24, 3, 4)
    objectness[0, 2, 1, 2] = 3.0  # the anchor (16, 0, 48, 32) scores highest ...
    deltas[0, 8:12, 1, 2] = torch.tensor([0.25, 0.25, math.log(2), 0.0])  # ... moved and widened
    objectness[0, 3, 2, 0] = 2.0  # second: (-32, 0, 32, 64) at row 2, column 0, clipped to x >= 0
    rpn.head = _FixedHead(objectness, deltas)
    batch = torch.zeros(1, 3, 48, 64)
    boxes, losses = propose(rpn, batch, [(48, 64)], torch.zeros(1, 8, 3, 4))
    # Centre (32, 16) + (0.25 * 32, 0.25 * 32) = (40, 24), width 32 * 2 = 64, height 32:
    # (8, 8, 72, 40), clipped to the 64 x 48 image.
    assert losses == {}
    assert_close(boxes[0], torch.tensor([[8.0, 8, 64, 40], [0, 0, 32, 48]]))


def test_rpn_losses_are_finite_and_objectness_falls_on_one_image():
    torch.manual_seed(0)
    trunk = build_backbone(BackboneConfig()).trunk
    image = torch.zeros(1, 3, 64, 96)
    image[:, :, 16:48, 32:64] = 2.0  # one bright 32 x 32 square: exactly an anchor of side 32
    with torch.no_grad():
        features = trunk(image)  # (1, 128, 4, 6)
    cfg = FasterRCNNConfig(anchor_sizes=(16, 32, 64), rpn_post_nms_train=20)
    rpn = build_rpn(cfg, 128).train()
    gt = [torch.tensor([[32.0, 16, 64, 48]])]
    opt = torch.optim.SGD(rpn.parameters(), lr=0.05, momentum=0.9)
    objectness = []
    for _ in range(15):
        boxes, losses = propose(rpn, image, [(64, 96)], features, gt)
        assert all(torch.isfinite(v) for v in losses.values())
        objectness.append(float(losses["loss_objectness"].detach()))
        opt.zero_grad()
        (losses["loss_objectness"] + losses["loss_rpn_box_reg"]).backward()
        opt.step()
    # 4 x 6 x 9 = 216 anchors, fewer than the 256 the loss draws: every labelled anchor is in every
    # step's sample, so the loss is one fixed function and descent lowers it.
    assert objectness[-1] < 0.5 * objectness[0]
    assert boxes[0].shape[0] <= 20
    inside = (boxes[0][:, :2] >= 0).all() and (boxes[0][:, 2] <= 96).all()
    assert inside and (boxes[0][:, 3] <= 64).all()


class _Untouchable(list):
    """Stands for the shared proposals: any use of it fails the test."""

    def _fail(self, *args):
        raise AssertionError("faster_rcnn read the selective-search proposals")

    __getitem__ = __iter__ = __len__ = __bool__ = _fail


def test_fit_never_reads_shared_proposals_and_detect_makes_its_own(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "trainval")
    images = [ds.load_image(i) for i in range(len(ds))]
    data = TrainData(images, ds.annotations, _Untouchable(), 4)
    cfg = FasterRCNNConfig(
        scale=64,
        max_size=128,
        anchor_sizes=(16, 32, 64),
        solver=SolverConfig(iters=3, paper_iters=70000),
        rpn_pre_nms_test=100,
        rpn_post_nms_test=50,
    )
    det = FasterRCNN(cfg, build_context(4))
    timer = StageTimer("cpu")
    info = det.fit(data, timer)
    assert list(timer.seconds) == ["train"]
    assert np.isfinite(info["final_loss"]) and np.isfinite(info["final_rpn_loss"])
    image = torch.from_numpy(images[0])
    t = StageTimer("cpu")
    d = det.detect(image, None, t)
    assert set(t.seconds) == set(FasterRCNN.stage_groups)
    assert {"conv", "rpn", "roi_pool", "fc"} <= set(t.seconds)
    h, w = image.shape[:2]
    assert (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
    with pytest.raises(ValueError, match="makes its own proposals"):
        det.detect(image, torch.zeros((3, 4)), StageTimer("cpu"))
    assert det.paper_schedule({"train": 3.0})["hours"] == pytest.approx(3.0 * 70000 / 3 / 3600)


def test_each_forward_pass_runs_one_unpadded_image_and_a_step_averages_two(tiny_voc):
    # py-faster-rcnn: IMS_PER_BATCH 1 per pass, iter_size 2 passes per SGD step.
    ds = VOCDataset(tiny_voc[0], "trainval")
    images = [ds.load_image(i) for i in range(len(ds))]
    data = TrainData(images, ds.annotations, _Untouchable(), 4)
    cfg = FasterRCNNConfig(
        scale=64, max_size=128, anchor_sizes=(16, 32, 64), solver=SolverConfig(iters=3), flip=False
    )
    det = FasterRCNN(cfg, build_context(4))
    scaled = set()
    for image in images:
        x, _ = prepare_image(torch.from_numpy(image), cfg.scale, cfg.max_size)
        scaled.add(tuple(x.shape))
    shapes, parts = [], []
    det.net.trunk.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    make = det._loss_fn

    def recording(*args):
        fn = make(*args)
        return lambda it: parts.append(fn(it)) or parts[-1]

    det._loss_fn = recording
    with sgd_steps() as steps:
        info = det.fit(data, StageTimer("cpu"))
    assert len(steps) == 3 and len(shapes) == len(parts) == 6  # two passes per SGD step
    assert all(s[0] == 1 and s[1:] in scaled for s in shapes)  # one image, as resized: no padding
    # A step's loss is the sum of its passes' (each an image's loss / images_per_batch): the mean.
    assert info["final_loss"] == pytest.approx(float(sum(p.detach() for p in parts)) / 3)


def test_frozen_convs_stay_put_and_biases_take_the_solver_multiplier(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "trainval")
    data = TrainData([ds.load_image(i) for i in range(2)], ds.annotations[:2], _Untouchable(), 4)
    solver = SolverConfig(iters=1, lr=0.01, bias_lr_mult=2.0, bias_decay=False)
    cfg = FasterRCNNConfig(scale=64, max_size=128, anchor_sizes=(16, 32, 64), solver=solver)
    det = FasterRCNN(replace(cfg, frozen_convs=2), build_context(4))
    convs = trunk_convs(det.net)
    before = [c.weight.detach().clone() for c in convs]
    with sgd_steps() as steps:
        det.fit(data, StageTimer("cpu"))
    assert [torch.equal(c.weight, b) for c, b in zip(convs, before, strict=True)] == [
        k < 2 for k in range(len(convs))
    ]
    (groups,) = steps
    assert {g["lr_mult"] for g in groups} == {1.0, 2.0}  # weights, biases
    assert all((g["weight_decay"] == 0.0) == (g["lr_mult"] == 2.0) for g in groups)
    trained = set().union(*(g["params"] for g in groups))
    assert not any(id(p) in trained for c in convs[:2] for p in c.parameters())
    with pytest.raises(ValueError, match="frozen_convs"):
        FasterRCNN(replace(cfg, frozen_convs=len(convs) + 1), build_context(4))


def test_fidelity_rows_follow_the_config():
    rows = {r.name: r for r in render(FasterRCNN.originals, FasterRCNNConfig(), "vgg16")}
    assert rows["RPN top-N after NMS, test"].status == "match"
    assert rows["leading conv layers frozen"].status == "deviation"  # 0 by default, 4 in VGG16's
    changed = {
        r.name: r
        for r in render(FasterRCNN.originals, FasterRCNNConfig(rpn_post_nms_test=1000), "vgg16")
    }
    assert changed["RPN top-N after NMS, test"].value == "1000"
    assert changed["RPN top-N after NMS, test"].status == "deviation"
    assert all("py-faster-rcnn@" in r.source for r in rows.values())


def test_head_batch_from_no_proposals_is_the_ground_truth():
    det = FasterRCNN(FasterRCNNConfig(), build_context(3))
    gt = torch.tensor([[10.0, 10, 50, 40], [60, 5, 90, 70]])
    rois, labels, targets = det._sample(
        [torch.zeros((0, 4))], [gt], [torch.tensor([3, 1])], torch.Generator().manual_seed(0)
    )
    # Only the two boxes themselves, both foreground, image 0, no offset to learn.
    order = torch.argsort(labels, descending=True)
    assert_close(rois[order], torch.tensor([[0.0, 10, 10, 50, 40], [0, 60, 5, 90, 70]]))
    assert labels[order].tolist() == [3, 1] and targets.abs().sum() == 0


def test_no_candidate_above_the_score_threshold_gives_no_detections():
    # A softmax probability never exceeds 1: every RPN proposal is dropped before box regression.
    cfg = FasterRCNNConfig(scale=64, max_size=128, anchor_sizes=(16, 32, 64), score_thresh=1.0)
    det = FasterRCNN(cfg, build_context(4))
    image = torch.randint(0, 256, (64, 96, 3), dtype=torch.uint8)
    t = StageTimer("cpu")
    d = det.detect(image, None, t)
    assert d.boxes.shape == (0, 4) and set(t.seconds) == set(FasterRCNN.stage_groups)


def test_difficult_objects_are_targets_only_where_the_block_says(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "trainval")
    i = next(k for k, a in enumerate(ds.annotations) if a.difficult.any())
    data = TrainData([], ds.annotations, [], 4, train_difficult=True)
    ann = ds.annotations[i]
    for use, expected in ((False, int((~ann.difficult).sum())), (True, len(ann.labels))):
        det = FasterRCNN(replace(SMALL, use_difficult=use), build_context(4))
        boxes, labels = det.training_split(data).ground_truth(i)
        assert len(boxes) == len(labels) == expected
