from __future__ import annotations

import torch
from rcnn_bench.pipelines.parts.conv_map import conv_map, pad_images, prepare_image
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import nn
from torch.testing import assert_close


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


def test_pad_images_put_each_image_top_left_on_zeros():
    a, b = torch.ones(3, 2, 5), torch.full((3, 4, 3), 2.0)
    batch = pad_images([a, b])
    assert batch.shape == (2, 3, 4, 5)
    assert torch.equal(batch[0, :, :2, :5], a) and batch[0, :, 2:].abs().sum() == 0
    assert torch.equal(batch[1, :, :4, :3], b) and batch[1, :, :, 3:].abs().sum() == 0
