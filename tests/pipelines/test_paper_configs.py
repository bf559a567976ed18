"""The paper configs in `make test`, scaled down: the real VGG16 and AlexNet (random weights, read from a
file as torchvision state dicts), two tiny images, two iterations with a learning-rate step between them.
What only shows on those networks is checked on them: which layers train, at which multiples of the
learning rate, and the step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.harness.run import build_pipelines
from rcnn_bench.datasets.voc import VOCDataset
from rcnn_bench.pipelines.parts.backbones import build_backbone, trunk_convs
from rcnn_bench.pipelines.parts.batches import training_regions
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import nn
from torchvision import models

from tests.pipelines.helpers import jittered_proposals, sgd_steps

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"

# Sizes and schedule only: every other pipeline setting is the config file's.
SCALED_DOWN = [
    "device=cpu",
    "pipelines.rcnn.solver.iters=2",
    "pipelines.rcnn.solver.lr_step=1",  # the step the paper takes at 20k, here after iteration 0
    "pipelines.rcnn.batch_size=2",
    "pipelines.rcnn.fg_fraction=0.5",
    "pipelines.fast_rcnn.solver.iters=2",
    "pipelines.fast_rcnn.solver.lr_step=1",
    "pipelines.fast_rcnn.scale=64",
    "pipelines.fast_rcnn.max_size=100",
    "pipelines.fast_rcnn.rois_per_image=4",
]


def _tiny_data(tiny_voc, train_difficult: bool) -> TrainData:
    ds = VOCDataset(tiny_voc[0], "trainval")
    anns = ds.annotations[:2]
    props = jittered_proposals(anns, 2, seed=0)
    return TrainData([ds.load_image(i) for i in range(2)], anns, props, 4, train_difficult)


def _check_steps(steps: list[list[dict]], lr: float, mults: list[float]) -> None:
    """Two SGD steps with groups at ``mults`` (weights, then biases at 2x without weight decay), the
    second at a tenth of the first's rate."""
    assert len(steps) == 2
    for k, step in enumerate(steps):
        assert [g["lr_mult"] for g in step] == mults
        assert [g["weight_decay"] for g in step] == [5e-4, 0.0] * (len(mults) // 2)
        assert [g["lr"] for g in step] == pytest.approx([lr * 0.1**k * m for m in mults])


@pytest.mark.parametrize(
    "config, network, frozen", [("vgg16_voc07", "vgg16", 4), ("alexnet_voc07", "alexnet", 1)]
)
def test_paper_config_trains_what_the_originals_trained(
    config, network, frozen, tiny_voc, tmp_path
):
    torch.manual_seed(0)
    saved = models.get_model(network, weights=None).state_dict()
    path = tmp_path / f"{network}.pt"
    torch.save(saved, path)
    cfg = load_config(CONFIGS / f"{config}.yaml", [*SCALED_DOWN, f"backbone.weights={path}"])
    backbone = build_backbone(cfg.backbone)
    assert torch.equal(backbone.trunk[0].weight, saved["features.0.weight"])  # read from the file
    dets = build_pipelines(cfg, backbone, 4, torch.device("cpu"), 0)
    del backbone, saved
    data = _tiny_data(tiny_voc, cfg.pipelines["fast_rcnn"].use_difficult)

    # Fast R-CNN: the first `frozen` convolutions do not move, every other layer does.
    fast = dets["fast_rcnn"]
    names = {id(m): n for n, m in fast.net.named_modules()}
    convs = [names[id(c)] for c in trunk_convs(fast.net)]
    before = {k: v.clone() for k, v in fast.net.state_dict().items()}
    with sgd_steps() as steps:
        fast.fit(data, StageTimer("cpu"))
    after = fast.net.state_dict()
    for k, conv in enumerate(convs):
        for part in ("weight", "bias"):
            key = f"{conv}.{part}"
            assert torch.equal(after[key], before[key]) == (k < frozen), key
    fc6 = next(n for n, m in fast.net.head.named_modules() if isinstance(m, nn.Linear))
    assert not torch.equal(after[f"head.{fc6}.weight"], before[f"head.{fc6}.weight"])
    # Per trained conv, the fc head, cls_score and bbox_pred: weights at 1x, biases at 2x.
    _check_steps(steps, 0.001, [1.0, 2.0] * (len(convs) - frozen + 3))

    # R-CNN: every layer trains; the new classifier at 10x, its bias at 20x.
    rcnn = dets["rcnn"]
    rois, _, matches = training_regions(data, rcnn.cfg.fg_iou)
    with sgd_steps() as steps:
        rcnn._finetune(data, rois, matches)
    _check_steps(steps, 0.001, [1.0, 2.0] * (len(trunk_convs(rcnn.net)) + 1) + [10.0, 20.0])
    assert all(p.requires_grad for p in rcnn.net.parameters())
