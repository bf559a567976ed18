from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from rcnn_bench.datasets.voc import VOCDataset
from rcnn_bench.pipelines.parts.backbones import (
    BackboneConfig,
    build_backbone,
    normalize_image,
    trunk_convs,
)
from rcnn_bench.pipelines.parts.batches import training_regions
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.parts.proposals import ProposalConfig, load_or_compute
from rcnn_bench.pipelines.parts.svm import SVMConfig
from rcnn_bench.pipelines.parts.svm_head import train_svm_head
from rcnn_bench.pipelines.parts.training import SolverConfig
from rcnn_bench.pipelines.rcnn import RCNN, RCNNConfig
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch.testing import assert_close

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


def _tiny_data(tiny_voc, images: int = 3) -> TrainData:
    ds = VOCDataset(tiny_voc[0], "trainval")
    anns = ds.annotations[:images]
    props = jittered_proposals(anns, 4, seed=0)
    # Every object a target, as in the originals: every image then has foreground RoIs.
    return TrainData(
        [ds.load_image(i) for i in range(images)], anns, props, 4, train_difficult=True
    )


@pytest.mark.parametrize("frozen", [0, 1])
def test_finetuning_groups_multipliers_and_step(frozen, tiny_voc, tmp_path):
    lr = 0.01
    solver = SolverConfig(iters=2, lr=lr, lr_step=1, bias_lr_mult=2.0, bias_decay=False)
    cfg = RCNNConfig(
        context_pad=4, solver=solver, batch_size=8, cls_lr_mult=10.0, frozen_convs=frozen
    )
    det = RCNN(cfg, build_context(4, tmp_path))
    data = _tiny_data(tiny_voc)
    rois, _, matches = training_regions(data, cfg.fg_iou)
    with sgd_steps() as steps:
        det._finetune(data, rois, matches)
    still = {id(p) for c in trunk_convs(det.net)[:frozen] for p in c.parameters()}
    net_w = {id(p) for p in det.net.parameters() if p.ndim > 1} - still
    net_b = {id(p) for p in det.net.parameters() if p.ndim == 1} - still
    cls_w, cls_b = {id(det.cls.weight)}, {id(det.cls.bias)}
    # Every layer trains but the first `frozen` convolutions (the original: none frozen); biases 2x
    # without decay; the new classifier 10x (bias 20x); the second iteration at a tenth of the rate.
    want = {(1.0, 5e-4): net_w, (2.0, 0.0): net_b, (10.0, 5e-4): cls_w, (20.0, 0.0): cls_b}
    for k, step in enumerate(steps):
        got: dict[tuple[float, float], set[int]] = {}
        for g in step:
            got.setdefault((g["lr_mult"], g["weight_decay"]), set()).update(g["params"])
            assert g["lr"] == pytest.approx(lr * 0.1**k * g["lr_mult"])
        assert got == want
    assert [p.requires_grad for p in det.net.parameters()] == [
        id(p) not in still for p in det.net.parameters()
    ]
    assert len(steps) == 2


def _svm_head_of(det: RCNN, data: TrainData, features: str, tmp_path, calls: list[int]):
    """train_svm_head on the untrained network's features with ``features``; ``calls`` records the
    images whose features were computed."""
    regions = training_regions(data, det.cfg.fg_iou)

    def features_of(i, boxes):
        calls.append(i)
        image = normalize_image(torch.from_numpy(data.images[i]))
        layers = det._layers(det.net, image, boxes, StageTimer("cpu"))
        return layers["out"], layers["pool5"]

    cfg = replace(det.cfg, features=features)
    work = tmp_path / f"rcnn-{features}-work-0"
    return train_svm_head(features_of, 256, data, regions, cfg, work, StageTimer("cpu"))


def test_features_none_recomputes_and_trains_the_disk_strategys_svms(tiny_voc, tmp_path):
    data = _tiny_data(tiny_voc, images=4)
    cfg = RCNNConfig(context_pad=4, svm=SVMConfig(retrain_limit=20), test_topk="fixed")
    det = RCNN(cfg, build_context(4, tmp_path))
    disk_calls, none_calls = [], []
    disk, disk_info = _svm_head_of(det, data, "disk", tmp_path, disk_calls)
    none, none_info = _svm_head_of(det, data, "none", tmp_path, none_calls)
    # disk: one pass that writes fc7; none: that pass without writing, then each image again when
    # mining reaches it (the SVMs then fit the same float16 features).
    assert disk_calls == [0, 1, 2, 3] and none_calls == [0, 1, 2, 3, 0, 1, 2, 3]
    assert (disk_info["features"], none_info["features"]) == ("disk", "none")
    assert torch.equal(disk.weight, none.weight) and torch.equal(disk.bias, none.bias)
    assert torch.equal(disk.regressors.weight, none.regressors.weight)
    assert disk_info["svm"] == none_info["svm"]
    # Files: none keeps only the box-regression examples' pool5 (128 x 4 x 4, float16, a 128-byte
    # header); disk adds every region's fc7 (256, float16).
    regions, examples = disk_info["feature_cache_regions"], sum(disk_info["bbox_examples"])
    assert none_info["feature_cache_bytes"] == 128 + examples * 2048 * 2
    assert (
        disk_info["feature_cache_bytes"] == none_info["feature_cache_bytes"] + 128 + regions * 512
    )
    image, boxes = torch.from_numpy(data.images[1]), torch.from_numpy(data.proposals[1])
    found = []
    for head in (disk, none):
        det.svms[("fc7", True)] = head
        found.append(det.detect(image, boxes, StageTimer("cpu")))
    assert found[0].scores.numel() > 0
    for a, b in zip(found[0].__dict__.values(), found[1].__dict__.values(), strict=True):
        assert torch.equal(a, b)


def test_auto_features_follow_the_free_disk(tiny_voc, tmp_path, monkeypatch):
    data = _tiny_data(tiny_voc, images=2)
    det = RCNN(RCNNConfig(context_pad=4), build_context(4, tmp_path))
    fc7_bytes = 2 * 256 * sum(len(r) for r in training_regions(data, 0.5)[0])
    for free, want in ((fc7_bytes * 5 // 4, "disk"), (fc7_bytes * 5 // 4 - 1, "none")):
        usage = shutil._ntuple_diskusage(10**12, 0, free)
        monkeypatch.setattr(shutil, "disk_usage", lambda _, usage=usage: usage)
        _, info = _svm_head_of(det, data, "auto", tmp_path, [])
        assert info["features"] == want


def test_cache_bytes_follow_the_feature_strategy():
    # 10 images x 2000 regions of the tiny backbone: fc7 256 wide, pool5 128 x 4 x 4 = 2048 wide,
    # float16; pool5 for a tenth of the regions (the box-regression share).
    backbone = build_backbone(BackboneConfig())
    fc7, pool5 = 2 * 20000 * 256, 2 * 2000 * 2048
    disk, none = RCNNConfig(features="disk", variants=()), RCNNConfig(features="none", variants=())
    assert RCNN.cache_bytes(disk, 10, 2000, backbone) == fc7 + pool5
    assert RCNN.cache_bytes(none, 10, 2000, backbone) == pool5
    # A pool5 SVM variant caches pool5 of every region after the default's cache is gone.
    pool5_svm = replace(disk, variants=("pool5",))
    assert RCNN.cache_bytes(pool5_svm, 10, 2000, backbone) == 2 * 20000 * 2048
    assert RCNN.cache_bytes(replace(pool5_svm, features="none"), 10, 2000, backbone) == pool5
    auto = RCNNConfig(features="auto", variants=())
    assert RCNN.cache_bytes(auto, 10, 2000, backbone) == pool5  # the least it may keep
    assert RCNN.cache_bytes(auto, 10, 2000, backbone, free_bytes=10**12) == fc7 + pool5
    with pytest.raises(ValueError, match="features must be one of"):
        RCNNConfig(features="ram")


def _tiny_cfg(**settings) -> RCNNConfig:
    """Two fine-tuning iterations on 16-region batches and a short SVM mining: the variants' tests'
    tiny R-CNN, with ``settings`` on top."""
    return RCNNConfig(
        context_pad=4,
        solver=SolverConfig(iters=2),
        batch_size=16,
        svm=SVMConfig(retrain_limit=20),
        **settings,
    )


def test_variants_cut_the_network_and_train_svms_on_their_own_layer(tiny_voc, tmp_path):
    from rcnn_bench.benchmarks.harness.inference import count_costs
    from rcnn_bench.benchmarks.harness.run import weights_sha1

    data = _tiny_data(tiny_voc)
    cfg = _tiny_cfg(variants=("no_bbox_reg", "softmax", "pool5", "fc6_no_ft"))
    det = RCNN(cfg, build_context(4, tmp_path))
    initial = weights_sha1(build_backbone(BackboneConfig()))
    timer, variant_timer = StageTimer("cpu"), StageTimer("cpu")
    det.fit(data, timer)
    info = det.fit_variants(data, variant_timer)
    # The variants' training is recorded apart, per variant; the default's stages are its own.
    assert set(timer.seconds) == {"finetune", "features", "svm", "bbox_reg"}
    assert set(variant_timer.seconds) == {
        "pool5/features",
        "pool5/shared_extraction",  # the seconds of fit's extraction, whose pool5 it read
        "pool5/svm",
        "fc6_no_ft/features",
        "fc6_no_ft/svm",
    }
    assert set(info) == {"pool5", "fc6_no_ft"} and "bbox_examples" not in info["pool5"]
    assert weights_sha1(det.initial) == initial != weights_sha1(det.net)  # "_no_ft": untouched
    assert det.svms[("pool5", True)].weight.shape == (128 * 4 * 4, 4)
    assert det.svms[("fc6", False)].weight.shape == (256, 4)
    assert not list(tmp_path.glob("*-features-*"))  # every cache removed
    # Sizes by hand (tiny net: trunk, fc6 2048 -> 256, fc7 256 -> 256; 4 classes).
    trunk = sum(p.numel() for p in det.net.trunk.parameters())
    fc6, fc7 = 2048 * 256 + 256, 256 * 256 + 256
    assert det.model_size("pool5")["params"] == trunk + 2048 * 4 + 4
    assert det.model_size("fc6_no_ft")["params"] == trunk + fc6 + 256 * 4 + 4
    assert det.model_size("no_bbox_reg")["params"] == trunk + fc6 + fc7 + 256 * 4 + 4
    assert det.model_size("softmax")["params"] == trunk + fc6 + fc7 + 256 * 5 + 5
    (net,) = det.test_modules("fc6_no_ft")
    assert net.trunk is det.initial.trunk and len(net.head) == 2  # fc6 and its ReLU
    # FLOPs of one detection: the fc layers of the cut networks only, the same warp and trunk.
    image, proposals = torch.from_numpy(data.images[0]), torch.from_numpy(data.proposals[0])
    flops = {
        v: count_costs(det, image, proposals, torch.device("cpu"), v)["stage_flops"]
        for v in (None, "pool5", "fc6_no_ft")
    }
    r = len(proposals)
    assert flops[None]["fc"] == 2 * r * (2048 * 256 + 256 * 256)
    assert flops["fc6_no_ft"]["fc"] == 2 * r * 2048 * 256 and flops["pool5"]["fc"] == 0
    assert flops[None]["conv"] == flops["pool5"]["conv"] == flops["fc6_no_ft"]["conv"]


def test_softmax_variant_uses_no_svm_weights(tiny_voc, tmp_path):
    data = _tiny_data(tiny_voc)
    cfg = RCNNConfig(
        context_pad=4, solver=SolverConfig(iters=2), batch_size=16, variants=("softmax",)
    )
    det = RCNN(cfg, build_context(4, tmp_path))
    assert det.initial is None  # no variant without fine-tuning: no second network kept
    det.fit(data, StageTimer("cpu"))
    svm_tensors = {id(t) for head in det.svms.values() for t in head.tensors()}
    run = det.test_tensors("softmax") + [
        p for m in det.test_modules("softmax") for p in m.parameters()
    ]
    assert det.test_tensors("softmax") == [] and not svm_tensors & {id(t) for t in run}
    det.svms.clear()  # it detects without them: its scores are the softmax's, by hand
    image, proposals = torch.from_numpy(data.images[0]), torch.from_numpy(data.proposals[0])
    d = det.detect(image, proposals, StageTimer("cpu"), "softmax")
    with torch.no_grad():
        fc7 = det._layers(det.net, normalize_image(image), proposals, StageTimer("cpu"))["out"]
        probs = torch.softmax(det.cls(fc7), dim=1)[:, 1:]  # (R, K)
    assert len(d.scores)
    for score, label, box in zip(d.scores, d.labels, d.boxes, strict=True):
        row = (proposals == box).all(dim=1).nonzero()[0, 0]  # no box regression: a proposal
        assert_close(score, probs[row, label - 1])


def test_one_extraction_and_one_pass_per_network_serve_every_variant(tiny_voc, tmp_path):
    """Training: the fine-tuned layers kept from ``fit``'s extraction, the initial net's from its
    first variant's, train the very SVMs of each variant's own extraction. Test: each network's
    variants in one group pass (repeated images included) detect exactly what their own passes do,
    each under a budget of its own."""
    from rcnn_bench.benchmarks.harness.data import TestSet
    from rcnn_bench.benchmarks.harness.inference import TimingPlan, time_group_pass, time_pass

    data = _tiny_data(tiny_voc)
    cfg = _tiny_cfg(
        max_per_image=3,
        max_per_set_factor=2,  # a budget that binds: thresholds rise within the pass
    )
    det = RCNN(cfg, build_context(4, tmp_path))
    info = det.fit(data, StageTimer("cpu"))
    assert info["shared_layers"] == {
        "kept": True,
        "layers": ["pool5", "fc6"],
        "for": ["fc6", "pool5"],
        "bytes": 4 * info["feature_cache_regions"] * (2048 + 256),
    }
    variant_timer = StageTimer("cpu")
    shared_info = det.fit_variants(data, variant_timer)
    shared = dict(det.svms)
    assert shared_info["fc6"]["shared_extraction"]["from"] == "rcnn"
    assert shared_info["pool5_no_ft"]["shared_extraction"]["from"] == "fc7_no_ft"
    assert shared_info["fc7_no_ft"]["shared_extraction"] is None
    assert shared_info["fc7_no_ft"]["shared_layers"]["for"] == ["fc6_no_ft", "pool5_no_ft"]
    # A reader records the seconds of the extraction it read beside its own pass over the rows.
    seconds = shared_info["fc6_no_ft"]["shared_extraction"]["seconds"]
    assert seconds == variant_timer.seconds["fc7_no_ft/features"]
    assert variant_timer.seconds["fc6_no_ft/shared_extraction"] == seconds
    assert "fc7_no_ft/shared_extraction" not in variant_timer.seconds
    # Each variant extracting its own (no memory to share) trains the same SVMs.
    det.cfg = replace(cfg, shared_features_gib=0.0)
    det.svms = {("fc7", True): shared[("fc7", True)]}
    own_info = det.fit_variants(data, StageTimer("cpu"))
    assert set(det.svms) == set(shared)
    for key, head in shared.items():
        assert torch.equal(head.weight, det.svms[key].weight), key
        assert torch.equal(head.bias, det.svms[key].bias), key
    assert own_info["fc7_no_ft"]["shared_layers"]["kept"] is False
    assert all(i["shared_extraction"] is None for i in own_info.values())

    test = TestSet(
        [torch.from_numpy(image) for image in data.images],
        [torch.from_numpy(boxes) for boxes in data.proposals],
        data.annotations,
    )
    boxes_for = lambda name, i: test.boxes[i]  # noqa: E731
    plan = TimingPlan(warmup=(0,), timed=(1, 2), repeats=2)
    cpu = torch.device("cpu")
    groups = det.variant_groups(det.enabled_variants())
    assert groups == [("no_bbox_reg", "softmax", "fc6", "pool5"), RCNN_NO_FT]
    for group in groups:
        together = time_group_pass({"rcnn": det}, test, boxes_for, plan, cpu, group=group)
        for variant in group:
            alone = time_pass({"rcnn": det}, test, boxes_for, plan, cpu, variant=variant)
            mine, theirs = together["rcnn"][variant], alone["rcnn"]
            assert mine.shared_pass == group and len(mine.samples_ms) == 2
            assert set(mine.stages_ms[0]) >= {"warp", "conv", "fc", "classifier", "nms"}
            assert sum(len(d.scores) for d in mine.detections) > 0
            for a, b in zip(mine.detections, theirs.detections, strict=True):
                for x, y in zip(a.__dict__.values(), b.__dict__.values(), strict=True):
                    assert torch.equal(x, y), variant


RCNN_NO_FT = ("fc7_no_ft", "fc6_no_ft", "pool5_no_ft")
