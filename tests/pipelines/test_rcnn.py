from __future__ import annotations

import numpy as np
import torch

from datasets.voc import VOCDataset
from pipelines.detector import TrainData
from pipelines.proposals import ProposalConfig, load_or_compute
from pipelines.rcnn import RCNN, RCNNConfig
from pipelines.svm import SVMConfig
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig
from tests.conftest import build_context


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
