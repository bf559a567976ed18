from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rcnn_bench.datasets.voc import VOCDataset
from rcnn_bench.pipelines.originals import render
from rcnn_bench.pipelines.parts.conv_map import prepare_image
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.parts.proposals import ProposalConfig, load_or_compute
from rcnn_bench.pipelines.parts.svm import SVMConfig
from rcnn_bench.pipelines.parts.training import SolverConfig
from rcnn_bench.pipelines.runtime.timing import StageTimer
from rcnn_bench.pipelines.sppnet import SPPnet, SPPnetConfig, spatial_pyramid_pool, spp_head
from torch import nn
from torch.testing import assert_close

from tests.conftest import build_context


def test_pyramid_equals_adaptive_max_pooling_of_each_crop():
    features = torch.randn(1, 5, 14, 20)
    # RoIs on the 16-pixel grid whose cell counts (roi_pool includes the end cell: x2 / 16 is the
    # last column) are multiples of 6, so divisible by every level. roi_pool puts bin edges at
    # floor(i * n / l) and ceil((i + 1) * n / l) computed in floating point from the rounded box, while
    # adaptive pooling of the crop uses exact integers: with box corners that are whole cells and
    # n / l an integer both give the same edges, so the maxima are the same numbers; off the grid, or
    # with n = 7 and l = 3 (7 / 3 * 3 may round above 7), the two can take different cells.
    rois = torch.tensor(
        [
            [0, 0.0, 0, 80, 80],  # columns 0-5, rows 0-5
            [0, 32, 16, 208, 96],  # columns 2-13, rows 1-6
            [0, 128, 32, 208, 208],  # columns 8-13, rows 2-13
        ]
    )
    got = spatial_pyramid_pool(features, rois, (1, 2, 3, 6), 16)
    assert got.shape == (3, 5 * (1 + 4 + 9 + 36))
    for k, (_, x1, y1, x2, y2) in enumerate(rois.tolist()):
        crop = features[0, :, int(y1) // 16 : int(y2) // 16 + 1, int(x1) // 16 : int(x2) // 16 + 1]
        want = torch.cat([F.adaptive_max_pool2d(crop, lv).flatten() for lv in (1, 2, 3, 6)])
        assert_close(got[k], want, rtol=0, atol=0)


def test_spp_head_replaces_fc6_only():
    head = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    new = spp_head(head, 50, seed=3)
    assert (new[0].in_features, new[0].out_features) == (50, 8)
    assert new[2] is head[2] and new[1] is head[1]  # fc7 and the ReLUs are the shared head's own
    assert new[0].bias.abs().sum() == 0
    assert_close(new[0].weight, spp_head(head, 50, seed=3)[0].weight)  # the seed fixes fc6
    assert not torch.equal(new[0].weight, spp_head(head, 50, seed=4)[0].weight)
    # Kaiming normal (ReLU gain): std sqrt(2 / 50) = 0.2; 400 draws put the sample std within 15%.
    assert new[0].weight.std().item() == pytest.approx(0.2, rel=0.15)


def _tiny_data(tiny_voc, tmp_path):
    ds = VOCDataset(tiny_voc[0], "trainval")
    props, _ = load_or_compute(ds, ProposalConfig(resize_max_side=64, max_proposals=40), tmp_path)
    data = TrainData([ds.load_image(i) for i in range(len(ds))], ds.annotations, props.boxes, 4)
    return ds, props, data


def test_fine_tuning_leaves_the_conv_layers_unchanged(tiny_voc, tmp_path):
    _, _, data = _tiny_data(tiny_voc, tmp_path)
    solver = SolverConfig(iters=3, lr=0.01, paper_iters=300000)
    cfg = SPPnetConfig(scale=64, max_size=128, solver=solver, svm=SVMConfig(retrain_limit=20))
    det = SPPnet(cfg, build_context(4, tmp_path / "cache"))
    trunk = {k: v.clone() for k, v in det.trunk.state_dict().items()}
    fc6, fc7 = det.head[0].weight.clone(), det.head[2].weight.clone()
    timer = StageTimer("cpu")
    info = det.fit(data, timer)
    assert list(timer.seconds) == ["conv", "finetune", "features", "svm", "bbox_reg"]
    for key, value in det.trunk.state_dict().items():
        assert torch.equal(value, trunk[key]), key
    assert not torch.equal(det.head[0].weight, fc6) and not torch.equal(det.head[2].weight, fc7)
    # One float16 map per image, 128 channels at a sixteenth of the resized image's side.
    sizes = [prepare_image(torch.from_numpy(im), 64, 128)[0].shape[1:] for im in data.images]
    assert info["conv_maps_bytes"] == sum(128 * (h // 16) * (w // 16) * 2 for h, w in sizes)
    assert not list((tmp_path / "cache").glob("sppnet-features-*"))  # removed after training
    sched = det.paper_schedule(timer.seconds | {"finetune": 3.0, "pretrain": 100.0})
    others = sum(v for k, v in timer.seconds.items() if k != "finetune")
    assert sched["hours"] == pytest.approx((3.0 * 300000 / 3 + others) / 3600)


def test_pretraining_trains_the_trunk_before_it_is_frozen(tiny_voc, tmp_path):
    _, _, data = _tiny_data(tiny_voc, tmp_path)
    cfg = SPPnetConfig(scale=64, max_size=128, pretrain_iters=2, solver=SolverConfig(iters=2))
    det = SPPnet(cfg, build_context(4, tmp_path / "cache"))
    conv1 = det.trunk[0].weight.clone()
    timer = StageTimer("cpu")
    info = det.fit(data, timer)
    assert list(timer.seconds) == ["pretrain", "conv", "finetune", "features", "svm", "bbox_reg"]
    assert not torch.equal(det.trunk[0].weight, conv1) and "pretrain_final_loss" in info
    assert not any(p.requires_grad for p in det.trunk.parameters()) and not det.trunk.training


def test_detect_on_zero_proposals_and_on_proposals(tiny_voc, tmp_path):
    ds, props, data = _tiny_data(tiny_voc, tmp_path)
    cfg = SPPnetConfig(scale=64, max_size=128, solver=SolverConfig(iters=2))
    det = SPPnet(cfg, build_context(4, tmp_path / "cache"))
    det.fit(data, StageTimer("cpu"))
    image = torch.from_numpy(ds.load_image(1))
    empty = det.detect(image, torch.zeros((0, 4)), StageTimer("cpu"))
    assert empty.boxes.shape == (0, 4) and empty.labels.dtype == torch.long
    t = StageTimer("cpu")
    proposals = torch.from_numpy(props.boxes[1])
    det.detect(image, proposals, t)
    assert set(t.seconds) == {"preprocess", "conv", "spp", "fc", "classifier", "bbox_reg", "nms"}
    assert set(t.seconds) == set(SPPnet.stage_groups)
    plain = det.detect(image, proposals, StageTimer("cpu"), "no_bbox_reg")
    assert len(plain.boxes)
    for box in plain.boxes:  # without regression every detection is one of the proposals
        assert (proposals == box).all(dim=1).any()


def test_fidelity_rows_follow_the_config():
    rows = {r.name: r for r in render(SPPnet.originals, SPPnetConfig(), "vgg16")}
    assert rows["pyramid levels (l x l bins)"].status == "match"
    assert rows["SVM C"].status == "match"
    changed = {r.name: r for r in render(SPPnet.originals, SPPnetConfig(levels=(1, 2, 4)), "vgg16")}
    assert changed["pyramid levels (l x l bins)"].value == "1, 2, 4"
    assert changed["pyramid levels (l x l bins)"].status == "deviation"
    assert all("SPP_net@" in r.source for r in rows.values())
