"""backbone.pretrain: the shared pre-trained initial weights (benchmarks/pretrain.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from rcnn_bench.benchmarks.config import ConfigError, load_config
from rcnn_bench.benchmarks.harness import pretrain
from rcnn_bench.benchmarks.harness.run import weights_sha1
from rcnn_bench.datasets.synthetic import SyntheticConfig, draw_images, generate
from rcnn_bench.pipelines.parts.backbones import BackboneConfig, PretrainConfig

SMALL = BackboneConfig(
    tiny_channels=(4, 4, 8, 8),
    tiny_fc=16,
    pretrain=PretrainConfig(iters=3, images=12, batch_size=8),
)


def test_jittered_by_hand():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 4.0]])
    out = pretrain.jittered(boxes, np.random.default_rng(5))
    rng = np.random.default_rng(5)  # the same draws, in the same order
    shift = rng.uniform(-pretrain.JITTER, pretrain.JITTER, size=(2, 4))
    zoom = np.exp(rng.uniform(0, np.log(pretrain.ZOOM), size=(2, 1)))
    for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        w, h = x2 - x1, y2 - y1
        a = x1 + shift[k, 0] * w
        b = y1 + shift[k, 1] * h
        c = x2 + shift[k, 2] * w
        d = y2 + shift[k, 3] * h
        cx, cy, hw, hh = (
            (a + c) / 2,
            (b + d) / 2,
            (c - a) / 2 * zoom[k, 0],
            (d - b) / 2 * zoom[k, 0],
        )
        assert out[k].tolist() == pytest.approx([cx - hw, cy - hh, cx + hw, cy + hh], rel=1e-5)


def test_crops_follow_the_objects():
    x, y = pretrain.crops(3, 0, 32, np.random.default_rng(0))
    anns = [ann for _, ann in draw_images(3, [pretrain.PRETRAIN_STREAM, 0], SyntheticConfig())]
    expected = [label - 1 for ann in anns for label in ann.labels.tolist() * pretrain.COPIES]
    assert y.tolist() == expected
    assert x.shape == (len(expected), 3, 32, 32)


def test_pretraining_images_are_not_a_data_sets(tmp_path):
    """The images come from a seed stream no synthetic data set uses: never the run's own images."""
    written = generate(tmp_path, SyntheticConfig(seed=0, train_images=1, test_images=0))
    ours = draw_images(1, [pretrain.PRETRAIN_STREAM, 0], SyntheticConfig())
    assert written["trainval"][0].boxes.tolist() != ours[0][1].boxes.tolist()


def test_trained_once_then_read_from_the_cache(tmp_path):
    cpu = torch.device("cpu")
    first, record = pretrain.initial_backbone(SMALL, tmp_path, cpu)
    assert record["cached"] is False and record["iters"] == 3
    files = sorted(p.name for p in (tmp_path / "pretrained").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".pt")
    sidecar = json.loads((tmp_path / "pretrained" / files[0]).read_text())
    assert sidecar["held_out_accuracy"] == record["held_out_accuracy"]
    again, cached = pretrain.initial_backbone(SMALL, tmp_path, cpu)
    assert cached["cached"] is True and cached["file"] == record["file"]
    assert weights_sha1(again) == weights_sha1(first)
    random_init, none = pretrain.initial_backbone(
        BackboneConfig(tiny_channels=(4, 4, 8, 8), tiny_fc=16), tmp_path, cpu
    )
    assert none is None and weights_sha1(random_init) != weights_sha1(first)


def test_same_config_same_weights_in_a_fresh_cache(tmp_path):
    """The weights follow from the config: trained twice from nothing, they are identical."""
    cpu = torch.device("cpu")
    a, _ = pretrain.initial_backbone(SMALL, tmp_path / "a", cpu)
    b, _ = pretrain.initial_backbone(SMALL, tmp_path / "b", cpu)
    assert weights_sha1(a) == weights_sha1(b)
    other = BackboneConfig(
        tiny_channels=(4, 4, 8, 8),
        tiny_fc=16,
        pretrain=PretrainConfig(iters=3, images=12, batch_size=8, seed=1),
    )
    c, record = pretrain.initial_backbone(other, tmp_path / "a", cpu)
    assert weights_sha1(c) != weights_sha1(a) and record["cached"] is False


def test_a_damaged_cache_file_is_named(tmp_path):
    cpu = torch.device("cpu")
    _, record = pretrain.initial_backbone(SMALL, tmp_path, cpu)
    with open(record["file"], "wb") as f:
        f.write(b"not a state dict")
    with pytest.raises(ValueError, match=re.escape(record["file"])):
        pretrain.initial_backbone(SMALL, tmp_path, cpu)


def test_pretraining_needs_random_weights(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone: {name: vgg16, weights: imagenet, pretrain: {iters: 10}}\n")
    with pytest.raises(ConfigError, match=r"backbone\.pretrain\.iters"):
        load_config(path)
