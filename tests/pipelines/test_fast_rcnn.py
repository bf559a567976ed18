from __future__ import annotations

from collections import Counter
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from datasets.voc import VOCDataset
from pipelines import fast_rcnn
from pipelines.backbones import BackboneConfig, build_backbone
from pipelines.boxes import boxes_to_rois, decode_deltas, encode_deltas, flip_boxes
from pipelines.detector import ScoreBudget, TrainData
from pipelines.fast_rcnn import (
    DeltaNorm,
    FastRCNN,
    FastRCNNConfig,
    conv_map,
    detection_loss,
    draw_image,
    head_detections,
    pool_rois,
    prepare_image,
    regression_targets,
    sample_rois,
    svd_variant,
    training_entries,
)
from pipelines.rcnn import SVMHead
from pipelines.sampling import match
from pipelines.svm import SVMConfig
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig
from tests.conftest import build_context
from tests.pipelines.helpers import jittered_proposals, sgd_steps


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
    got = pool_rois(det.net, features, rois)  # pool 4x4 at scale 1/16
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


def test_conv_map_is_the_resized_image_through_the_trunk_in_two_stages():
    image = torch.randint(0, 255, (40, 100, 3), dtype=torch.uint8)
    trunk = nn.Conv2d(3, 2, 3, stride=2)
    timer = StageTimer("cpu")
    x, features, s = conv_map(trunk, image, 80, 150, timer)
    ref_x, ref_s = prepare_image(image, 80, 150)
    assert s == ref_s == 1.5
    assert_close(x, ref_x)
    assert_close(features, trunk(ref_x[None]))
    assert features.shape == (1, 2, 29, 74)  # (60 - 3) // 2 + 1, (150 - 3) // 2 + 1
    assert set(timer.seconds) == {"preprocess", "conv"}


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


def test_draw_image_takes_each_entry_once_per_epoch():
    gen, order, pool = torch.Generator().manual_seed(0), [], [0, 1, 4, 5]
    epochs = [sorted(draw_image(order, pool, gen) for _ in pool) for _ in range(3)]
    assert epochs == [pool] * 3


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
    cfg = _tiny_cfg(rois_per_image=1, fg_fraction=1.0)
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
    heads = fast_rcnn.new_heads(net.fc_dim, 2)
    nn.init.normal_(heads[1].weight, std=0.1)  # deltas that move the boxes
    cfg = _tiny_cfg(test_topk="fixed", score_thresh=0.0)  # every (RoI, class) pair a candidate
    pooled, candidates = [], []

    def pool_spy(*args):
        pooled.append(len(args[2]))
        return real_pool(*args)

    def select_spy(boxes, scores, labels, *args):  # candidates in (RoI, class) order
        candidates.append((boxes.reshape(3, 2, 4), scores.reshape(3, 2)))
        return real_select(boxes, scores, labels, *args)

    real_pool, real_select = fast_rcnn.pool_rois, fast_rcnn.select
    with (
        mock.patch.object(fast_rcnn, "pool_rois", side_effect=pool_spy),
        mock.patch.object(fast_rcnn, "select", side_effect=select_spy),
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


def test_adaptive_detect_keeps_at_most_max_per_image_per_class(tiny_voc):
    data = _tiny_data(tiny_voc, images=1)
    det = FastRCNN(_tiny_cfg(max_per_image=1), build_context(4))
    image, proposals = torch.from_numpy(data.images[0]), torch.from_numpy(data.proposals[0])
    d = det.detect(image, proposals, StageTimer("cpu"))
    assert sorted(d.labels.tolist()) == [1, 2, 3, 4]  # untrained: every class scores some RoI
    assert isinstance(det.test_budget(), ScoreBudget)


def test_model_size_counts_what_each_variant_runs():
    from pipelines.svd import compress_head

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
    args = (net, net.head, heads, features, rois, 1.0, (64, 64), _tiny_cfg())
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
