from __future__ import annotations

import re

import pytest
import torch
from rcnn_bench.benchmarks.config import RunConfig
from rcnn_bench.benchmarks.harness.run import build_pipelines, weights_sha1
from rcnn_bench.pipelines.parts.backbones import BackboneConfig, build_backbone, truncate
from torch.testing import assert_close


def test_seeded_init_is_reproducible():
    a = build_backbone(BackboneConfig(seed=1)).state_dict()
    b = build_backbone(BackboneConfig(seed=1)).state_dict()
    c = build_backbone(BackboneConfig(seed=2)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_both_detectors_start_from_the_same_weights():
    cfg = RunConfig()
    backbone = build_backbone(cfg.backbone)
    dets = build_pipelines(cfg, backbone, num_classes=4, device=torch.device("cpu"), seed=0)
    r, f = (dets[name].net.state_dict() for name in ("rcnn", "fast_rcnn"))
    assert r.keys() == f.keys()
    assert all(torch.equal(r[k], f[k]) for k in r)
    assert dets["rcnn"].net is not dets["fast_rcnn"].net  # independent copies
    assert weights_sha1(dets["rcnn"].net) == weights_sha1(dets["fast_rcnn"].net)
    assert weights_sha1(dets["rcnn"].net) == weights_sha1(backbone)
    assert weights_sha1(dets["faster_rcnn"].net) == weights_sha1(backbone)
    assert weights_sha1(dets["sppnet"].trunk) == weights_sha1(backbone.trunk)  # its fc6 is its own


@pytest.mark.parametrize("name, pool, size", [("alexnet", 6, 227), ("vgg16", 7, 224)])
def test_torchvision_backbones_shapes_and_local_weights(tmp_path, name, pool, size):
    from torchvision import models

    bb = build_backbone(BackboneConfig(name=name))
    assert bb.pool_size == pool and bb.input_size == size and bb.fc_dim == 4096
    # torchvision-layout weights from a local file load into trunk and head.
    net = models.get_model(name, weights=None)
    path = tmp_path / f"{name}.pt"
    torch.save(net.state_dict(), path)
    loaded = build_backbone(BackboneConfig(name=name, weights=str(path)))
    assert torch.equal(loaded.trunk[0].weight, net.features[0].weight)
    fc6 = net.classifier[1 if name == "alexnet" else 0]
    first_fc = next(m for m in loaded.head if isinstance(m, torch.nn.Linear))
    assert torch.equal(first_fc.weight, fc6.weight)


def test_tiny_trunk_has_stride_16():
    bb = build_backbone(BackboneConfig())
    assert bb.trunk(torch.zeros(1, 3, 64, 96)).shape[2:] == (4, 6)


def test_bad_weights_file(tmp_path):
    with pytest.raises(ValueError, match=re.escape("missing.pt: backbone weights file is missing")):
        build_backbone(BackboneConfig(weights=str(tmp_path / "missing.pt")))
    bad = tmp_path / "other.pt"
    torch.save({"trunk.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=re.escape("other.pt: weights do not fit this backbone")):
        build_backbone(BackboneConfig(weights=str(bad)))


def test_layer_multipliers_cover_every_parameter_and_freeze_the_first_convs():
    from rcnn_bench.pipelines.parts.backbones import layer_multipliers, trunk_convs

    bb = build_backbone(BackboneConfig())
    layers = layer_multipliers(bb, 2)
    convs = trunk_convs(bb)
    assert [m for m, _ in layers] == [*convs, bb.head]
    assert [mult for _, mult in layers] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    covered = [id(p) for m, _ in layers for p in m.parameters()]
    assert sorted(covered) == sorted(id(p) for p in bb.parameters())  # each exactly once
    with pytest.raises(ValueError, match="frozen_convs: 6 asked for, but the trunk has 5"):
        layer_multipliers(bb, 6)


@pytest.mark.parametrize("name, convs, frozen", [("vgg16", 13, (0, 2, 5, 7)), ("alexnet", 5, (0,))])
def test_the_originals_frozen_convs_are_the_first_of_the_trunk(name, convs, frozen):
    # VGG16's conv1_1, conv1_2, conv2_1, conv2_2 are features.0, 2, 5, 7; CaffeNet's conv1 is AlexNet's
    # features.0. Built on the meta device: only the structure matters.
    from rcnn_bench.pipelines.parts.backbones import layer_multipliers, trunk_convs

    with torch.device("meta"):
        bb = build_backbone(BackboneConfig(name=name))
    assert len(trunk_convs(bb)) == convs
    layers = layer_multipliers(bb, len(frozen))
    zero = [m for m, mult in layers if mult == 0]
    assert zero == [bb.trunk[i] for i in frozen]


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _fc(fin: int, fout: int) -> int:
    return fin * fout + fout


# Per network: (trunk parameters, pool5 width C*P*P, fc6 parameters, fc7 parameters, fc width).
_TINY_TRUNK = _conv(3, 16, 3) + _conv(16, 32, 3) + _conv(32, 64, 3) + _conv(64, 128, 3)
_ALEXNET_TRUNK = (
    _conv(3, 64, 11)
    + _conv(64, 192, 5)
    + _conv(192, 384, 3)
    + _conv(384, 256, 3)
    + _conv(256, 256, 3)
)
_VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
_VGG16_CONVS += [(256, 512)] + [(512, 512)] * 5
_LAYERS = {
    "tiny": (_TINY_TRUNK + _conv(128, 128, 3), 128 * 4 * 4, _fc(2048, 256), _fc(256, 256), 256),
    "alexnet": (_ALEXNET_TRUNK, 256 * 6 * 6, _fc(9216, 4096), _fc(4096, 4096), 4096),
    "vgg16": (
        sum(_conv(a, b, 3) for a, b in _VGG16_CONVS),
        512 * 7 * 7,
        _fc(25088, 4096),
        _fc(4096, 4096),
        4096,
    ),
}


@pytest.mark.parametrize("name", ["tiny", "alexnet", "vgg16"])
def test_truncated_networks_keep_only_the_layers_up_to_the_cut(name):
    trunk, d5, fc6, fc7, width = _LAYERS[name]
    bb = build_backbone(BackboneConfig(name=name)).eval()
    pool5 = torch.randn(2, bb.channels, bb.pool_size, bb.pool_size)
    want = {"pool5": (trunk, d5), "fc6": (trunk + fc6, width), "fc7": (trunk + fc6 + fc7, width)}
    for layer, (params, dim) in want.items():
        cut = truncate(bb, layer)
        assert sum(p.numel() for p in cut.parameters()) == params, layer
        assert cut.fc_dim == dim and cut(pool5).shape == (2, dim), layer
        assert cut.trunk is bb.trunk  # shared, not copied: fine-tuning the net moves the cut one
    # pool5 is the flattened input; fc6 is the first fc layer and its ReLU, computed by hand.
    assert torch.equal(truncate(bb, "pool5")(pool5), pool5.flatten(1))
    first = next(m for m in bb.head if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        assert_close(truncate(bb, "fc6")(pool5), torch.relu(first(pool5.flatten(1))))
    with pytest.raises(ValueError, match="a network is cut after one of"):
        truncate(bb, "conv5")
