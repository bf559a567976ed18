"""The shared-map pipelines' first step (Fast R-CNN, SPPnet, Faster R-CNN): an image normalized, resized so
that its shorter side is ``scale`` pixels and its longer at most ``max_size``, and run through the conv
trunk once.

Shapes: N images, C trunk channels, H x W an image, h x w its resized size (h ~ s * H), stride 16.
    prepare_image: (H, W, 3) uint8 -> (3, h, w) float, and the factor s
    pad_images:    N x (3, h_n, w_n) -> (N, 3, max h_n, max w_n), zero to the right and bottom
    conv_map:      (H, W, 3) -> (3, h, w) -> trunk -> (1, C, h/16, w/16)
"""

from __future__ import annotations

import torch.nn.functional as F
from rcnn_bench.pipelines.parts.backbones import normalize_image
from rcnn_bench.pipelines.parts.floors import scale_factor
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import Tensor, nn

__all__ = ["conv_map", "pad_images", "prepare_image"]


def prepare_image(
    image: Tensor, scale: int, max_size: int, flip: bool = False
) -> tuple[Tensor, float]:
    """Normalize and resize one image for the conv trunk.

    Args:
        image: Tensor[H, W, 3] uint8 RGB.
        scale: target shorter side.
        max_size: cap on the longer side.
        flip: mirror it horizontally first.

    Returns:
        (Tensor[3, h, w], the factor s with h ~ s * H, w ~ s * W).
    """
    x = normalize_image(image)
    if flip:
        x = x.flip(2)
    h, w = x.shape[1:]
    s = scale_factor((h, w), scale, max_size)
    if abs(s - 1.0) > 1e-6:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    return x, s


def pad_images(images: list[Tensor]) -> Tensor:
    """Stack (3, h, w) images into (N, 3, H, W), zero (the mean colour) to the right and bottom."""
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    batch = images[0].new_zeros((len(images), 3, h, w))
    for n, x in enumerate(images):
        batch[n, :, : x.shape[1], : x.shape[2]] = x
    return batch


def conv_map(
    trunk: nn.Module, image: Tensor, scale: int, max_size: int, timer: StageTimer
) -> tuple[Tensor, Tensor, float]:
    """How every shared-map pipeline starts a detection: the image normalized and resized
    (stage "preprocess"), then the trunk's conv map of it (stage "conv").

    Returns:
        (the resized Tensor[3, h, w], its conv map Tensor[1, C, h', w'], the scale factor s).
    """
    with timer.stage("preprocess"):
        x, s = prepare_image(image, scale, max_size)
    with timer.stage("conv"):
        features = trunk(x[None])
    return x, features, s
