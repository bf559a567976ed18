from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F
from rcnn_bench.pipelines.parts import roi_head
from rcnn_bench.pipelines.parts.backbones import BackboneConfig, build_backbone
from rcnn_bench.pipelines.parts.boxes import boxes_to_rois, decode_deltas, encode_deltas
from rcnn_bench.pipelines.parts.roi_head import (
    DeltaNorm,
    detection_loss,
    head_detections,
    regression_targets,
    sample_rois,
)
from rcnn_bench.pipelines.parts.roi_pool import pool_rois
from rcnn_bench.pipelines.parts.sampling import match
from rcnn_bench.pipelines.parts.svm_head import SVMHead
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import nn
from torch.testing import assert_close


@dataclass(frozen=True)
class Head:
    """What the head reads (HeadSettings), at Fast R-CNN's defaults."""

    rois_per_image: int = 64
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: tuple[float, float] = (0.1, 0.5)
    bbox_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    bbox_loss_weight: float = 1.0
    score_thresh: float = 0.01
    nms_iou: float = 0.3
    max_per_class: int = 100


def test_loss_hand_built_case():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])  # background, then class 2
    deltas = torch.zeros(2, 8)
    deltas[1, 4:] = torch.tensor([0.5, -2.0, 0.0, 0.0])  # class 2's deltas of RoI 1
    targets = torch.zeros(2, 4)
    cls, box = detection_loss(logits, deltas, labels, targets)
    assert_close(cls, F.cross_entropy(logits, labels))
    # smooth L1 (beta 1): 0.5 * 0.5^2 + (2 - 0.5) = 1.625, over 2 RoIs; background rows ignored.
    assert_close(box, torch.tensor(1.625 / 2))
    _, none = detection_loss(logits, deltas, torch.tensor([0, 0]), targets)
    assert none == 0


def test_delta_norm_by_hand():
    deltas = torch.tensor(
        [[0.1, 0.2, 0.0, 0.5], [0.3, 0.2, 0.2, -0.5], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    )
    labels = torch.tensor([1, 1, 2, 1])
    norm = DeltaNorm.fit(deltas[:3], labels[:3], 3)
    # Class 1: means (0.2, 0.2, 0.1, 0), population stds (0.1, 0 -> 1, 0.1, 0.5); class 2: one target,
    # so its own mean and std 1; class 3: none, mean 0 and std 1.
    assert_close(norm.mean, torch.tensor([[0.2, 0.2, 0.1, 0.0], [1, 1, 1, 1], [0, 0, 0, 0]]))
    assert_close(norm.std, torch.tensor([[0.1, 1, 0.1, 0.5], [1, 1, 1, 1], [1, 1, 1, 1]]))
    normalised = norm.normalize(deltas, labels)
    assert_close(
        normalised,
        torch.tensor([[-1.0, 0, -1, 1], [1, 0, 1, -1], [0, 0, 0, 0], [-2, -0.2, -1, 0]]),
    )
    assert_close(norm.denormalize(normalised, labels), deltas)


def test_regression_targets_take_matched_rois_and_mirrored_copies():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    rois = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]])  # gt, IoU 0.82, 0
    m = match(rois, gt, torch.tensor([2]), 0.5)
    deltas, labels = regression_targets([rois], [gt], [m], mirrored=False)
    # The ground truth's own target is 0; the shifted box's centre is 0.1 of its width to the left.
    assert_close(deltas, torch.tensor([[0.0, 0, 0, 0], [-0.1, 0, 0, 0]]))
    assert labels.tolist() == [2, 2]
    both, labels = regression_targets([rois], [gt], [m], mirrored=True)
    assert_close(both[2:], torch.tensor([[0.0, 0, 0, 0], [0.1, 0, 0, 0]]))
    assert labels.tolist() == [2, 2, 2, 2]
    norm = DeltaNorm.fit(both, labels, 2)
    assert_close(norm.mean[1], torch.zeros(4))  # mirrored copies centre dx
    assert_close(norm.std[1], torch.tensor([0.005**0.5, 1, 1, 1]))  # sqrt((0.01 + 0.01) / 4)


def _fixed_head(k: int, fc_dim: int, cls_bias: list[float], deltas: list[float]):
    """cls_score and bbox_pred that ignore fc7: constant logits and deltas."""
    cls_score, bbox_pred = nn.Linear(fc_dim, k + 1), nn.Linear(fc_dim, 4 * k)
    for layer, bias in ((cls_score, cls_bias), (bbox_pred, deltas)):
        nn.init.zeros_(layer.weight)
        layer.bias.data = torch.tensor(bias)
    return cls_score, bbox_pred


def test_targets_normalised_in_training_and_mapped_back_at_test():
    norm = DeltaNorm(torch.tensor([[0.1, -0.1, 0.0, 0.2]]), torch.tensor([[0.5, 0.5, 0.25, 0.25]]))
    gt = torch.tensor([[10.0, 10, 30, 40]])
    rois = torch.tensor([[12.0, 8, 32, 36]])
    m = match(rois, gt, torch.tensor([1]), 0.5)
    cfg = Head(rois_per_image=1, fg_fraction=1.0)
    _, _, targets = sample_rois(rois, gt, m, cfg, torch.Generator().manual_seed(0), norm)
    want = (encode_deltas(rois, gt) - norm.mean) / norm.std
    assert_close(targets, want)
    # A head that predicts exactly that target puts the box back on the ground truth.
    net = build_backbone(BackboneConfig())
    heads = _fixed_head(1, net.fc_dim, [0.0, 5.0], targets[0].tolist())
    features = torch.zeros(1, net.channels, 4, 4)
    det = head_detections(
        net, net.head, heads, features, rois, 1.0, (64, 64), cfg, StageTimer("cpu"), norm=norm
    )
    assert_close(det.boxes, gt)
    fixed = head_detections(
        net, net.head, heads, features, rois, 1.0, (64, 64), cfg, StageTimer("cpu")
    )
    assert_close(fixed.boxes[0], decode_deltas(rois, targets, cfg.bbox_stds)[0])  # bbox_stds only


def test_dedup_pools_duplicates_once_and_maps_them_back():
    net = build_backbone(BackboneConfig())
    features = torch.randn(1, net.channels, 6, 6)
    # At s = 2 and stride 16, RoIs 0 and 1 are both (0, 0, 2, 2) on the map; RoI 2 is (2, 2, 5, 5).
    proposals = torch.tensor([[0.0, 0, 16, 16], [1, 1, 15, 17], [16, 16, 40, 40]])
    heads = roi_head.new_heads(net.fc_dim, 2)
    nn.init.normal_(heads[1].weight, std=0.1)  # deltas that move the boxes
    cfg = Head(score_thresh=0.0)  # every (RoI, class) pair a candidate
    pooled, candidates = [], []

    def pool_spy(*args):
        pooled.append(len(args[2]))
        return real_pool(*args)

    def select_spy(boxes, scores, labels, *args):  # candidates in (RoI, class) order
        candidates.append((boxes.reshape(3, 2, 4), scores.reshape(3, 2)))
        return real_select(boxes, scores, labels, *args)

    real_pool, real_select = roi_head.pool_rois, roi_head.select
    with (
        mock.patch.object(roi_head, "pool_rois", side_effect=pool_spy),
        mock.patch.object(roi_head, "select", side_effect=select_spy),
    ):
        for dedup in (1 / 16, 0.0):
            head_detections(
                net,
                net.head,
                heads,
                features,
                proposals,
                2.0,
                (48, 48),
                cfg,
                StageTimer("cpu"),
                dedup=dedup,
            )
    assert pooled == [2, 3]  # two unique RoIs pooled with dedup, three without
    (boxes_on, scores_on), (boxes_off, scores_off) = candidates
    # RoI 1 gets RoI 0's scores (the same pooled features either way) and RoI 0's regressed boxes.
    assert torch.equal(scores_on, scores_off)
    assert torch.equal(boxes_on[1], boxes_on[0]) and not torch.equal(boxes_off[1], boxes_off[0])
    assert torch.equal(boxes_on[[0, 2]], boxes_off[[0, 2]])


def test_svms_score_the_rois_in_place_of_the_softmax():
    # SVMs whose weights pick two of fc7's units score the one RoI by hand; cls_score says class
    # 1 whatever fc7 is, the SVMs say what their scores say.
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig())
    features = torch.randn(1, net.channels, 4, 4)
    rois = torch.tensor([[8.0, 8, 40, 40]])
    with torch.no_grad():
        fc7 = net(pool_rois(net, features, boxes_to_rois([rois])))[0]
    a, b = fc7.topk(2).indices.tolist()  # two units that fire
    weight = torch.zeros(net.fc_dim, 2)
    weight[a, 0], weight[b, 1] = -1.0, 1.0
    svms = SVMHead(weight, torch.tensor([0.0, 3.0]), 2.0, 1.0, None)
    heads = _fixed_head(2, net.fc_dim, [0.0, 5.0, 0.0], [0.0] * 8)
    args = (net, net.head, heads, features, rois, 1.0, (64, 64), Head())
    soft = head_detections(*args, StageTimer("cpu"))
    assert soft.labels.tolist()[0] == 1
    svm = head_detections(*args, StageTimer("cpu"), svms=(svms, -100.0))
    want = torch.tensor([-2.0 * float(fc7[a]), 2.0 * float(fc7[b]) + 3.0])  # classes 1, 2
    assert float(fc7[b]) > 0
    order = want.argsort(descending=True)
    assert_close(svm.scores, want[order])
    assert svm.labels.tolist() == (order + 1).tolist()
    above = head_detections(*args, StageTimer("cpu"), svms=(svms, float(want.max()) - 1e-3))
    assert above.labels.tolist() == [int(order[0]) + 1]  # the fixed threshold is the SVMs'
