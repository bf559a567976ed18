from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from pipelines.boxes import flip_boxes
from pipelines.detector import TrainData
from pipelines.fast_rcnn import FastRCNN, FastRCNNConfig, detection_loss, prepare_image
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig
from tests.conftest import build_context


def slow_roi_pool(features: torch.Tensor, roi, p: int, scale: float) -> torch.Tensor:
    """Caffe's RoI max pooling, one bin at a time (coordinates rounded half away from zero)."""
    c, h, w = features.shape
    x1, y1, x2, y2 = (int(np.floor(v * scale + 0.5)) for v in roi)
    rw, rh = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    out = torch.zeros(c, p, p)
    for i in range(p):
        for j in range(p):
            hs = min(max(int(np.floor(i * rh / p)) + y1, 0), h)
            he = min(max(int(np.ceil((i + 1) * rh / p)) + y1, 0), h)
            ws = min(max(int(np.floor(j * rw / p)) + x1, 0), w)
            we = min(max(int(np.ceil((j + 1) * rw / p)) + x1, 0), w)
            if he > hs and we > ws:
                out[:, i, j] = features[:, hs:he, ws:we].amax(dim=(1, 2))
    return out


def test_roi_pool_matches_slow_reference():
    det = FastRCNN(FastRCNNConfig(), build_context(3))
    features = torch.randn(1, 5, 9, 11)
    rois = torch.tensor(
        [[0, 0.0, 0, 175, 143], [0, 16, 32, 80, 64], [0, 40, 8, 47, 15], [0, 150, 100, 300, 300]]
    )
    got = det._pool(features, rois)  # pool 4x4 at scale 1/16
    for k in range(len(rois)):
        assert_close(got[k], slow_roi_pool(features[0], rois[k, 1:].tolist(), 4, 1 / 16))


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


def test_prepare_image_scale_cap_and_flip():
    image = torch.randint(0, 255, (40, 100, 3), dtype=torch.uint8)
    x, s = prepare_image(image, scale=80, max_size=150)
    assert s == 1.5 and x.shape == (3, 60, 150)  # 80 / 40 = 2 would make the long side 200
    xf, _ = prepare_image(image, 40, 1000, flip=True)
    assert_close(xf, prepare_image(image, 40, 1000)[0].flip(2))


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
    from datasets.voc import VOCDataset
    from pipelines.sampling import match, with_ground_truth

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
    from datasets.voc import VOCDataset
    from pipelines.proposals import ProposalConfig, load_or_compute

    ds = VOCDataset(tiny_voc[0], "trainval")
    props, _ = load_or_compute(
        ds, ProposalConfig(resize_max_side=64, max_proposals=40), tiny_voc[0] / "cache"
    )
    data = TrainData([ds.load_image(i) for i in range(len(ds))], ds.annotations, props.boxes, 4)
    cfg = FastRCNNConfig(scale=64, max_size=128, svd_ranks=(8, 8), solver=SolverConfig(iters=3))
    det = FastRCNN(cfg, build_context(4))
    timer = StageTimer("cpu")
    info = det.fit(data, timer)
    assert set(timer.seconds) == {"train", "svd"} and np.isfinite(info["final_loss"])
    image = torch.from_numpy(ds.load_image(0))
    empty = det.detect(image, torch.zeros((0, 4)), StageTimer("cpu"))
    assert empty.boxes.shape == (0, 4) and empty.labels.dtype == torch.long
    t = StageTimer("cpu")
    d = det.detect(image, torch.from_numpy(props.boxes[0]), t, "svd")
    assert {"conv", "roi_pool", "fc", "classifier", "bbox_reg", "nms"} <= set(t.seconds)
    h, w = image.shape[:2]
    assert (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
    assert det.paper_schedule(timer.seconds)["paper_iterations"] == 40000
