"""R-CNN's region warping: each proposal, dilated for context, resampled to the network input.

Shapes: R regions, S the network input side (227 CaffeNet/AlexNet, 224 VGG16, 64 tiny), p the context.

A proposal is grown about its centre so that, once warped to S x S, p pixels of context surround the
original box on every side: the box fills the middle (S - 2p) pixels. The whole batch is one
roi_align call on the mean-subtracted image (bilinear, one sample per output pixel); samples that fall
outside the image are zero, i.e. the mean colour, as in the original. R-CNN's fine-tuning mirrors
warped regions as Caffe's window data layer does (mirror_regions).
"""

from __future__ import annotations

import torch
from rcnn_bench.pipelines.parts.boxes import boxes_to_rois
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["dilate_for_context", "mirror_regions", "warp_regions"]


def dilate_for_context(boxes: Tensor, input_size: int, context_pad: int) -> Tensor:
    """Grow boxes about their centres by S / (S - 2p) so the warp leaves p pixels of context.

    Args:
        boxes (Tensor[R, 4]): xyxy proposals.
        input_size: S.
        context_pad: p, in warped pixels (16 in the paper); 0 warps the bare box.

    Returns:
        Tensor[R, 4]: the dilated boxes (they may extend beyond the image).
    """
    if not 0 <= 2 * context_pad < input_size:
        raise ValueError(f"context_pad {context_pad} does not fit a {input_size}-pixel input")
    scale = input_size / (input_size - 2 * context_pad)
    centre = 0.5 * (boxes[:, :2] + boxes[:, 2:])
    half = 0.5 * (boxes[:, 2:] - boxes[:, :2]) * scale
    return torch.cat((centre - half, centre + half), dim=1)


def warp_regions(image: Tensor, boxes: Tensor, input_size: int, context_pad: int) -> Tensor:
    """Warp every proposal of one image to the network input, in one batched call.

    Args:
        image (Tensor[3, H, W]): the mean-subtracted image.
        boxes (Tensor[R, 4]): xyxy proposals in the image's pixels.
        input_size: S.
        context_pad: p.

    Returns:
        Tensor[R, 3, S, S]: warped regions, zero where a sample falls outside the image.
    """
    s = input_size
    if boxes.shape[0] == 0:
        return image.new_zeros((0, image.shape[0], s, s))
    grown = dilate_for_context(boxes.to(image.dtype), s, context_pad)
    regions = roi_align(
        image[None],
        boxes_to_rois([grown]),
        output_size=s,
        spatial_scale=1.0,
        sampling_ratio=1,
        aligned=True,
    )  # (R, 3, S, S)
    # Continuous coordinate of each output pixel's sample: x1 + (j + 0.5) * bin width.
    steps = (torch.arange(s, device=image.device, dtype=image.dtype) + 0.5) / s  # (S,)
    xs = grown[:, 0:1] + steps * (grown[:, 2:3] - grown[:, 0:1])  # (R, S)
    ys = grown[:, 1:2] + steps * (grown[:, 3:4] - grown[:, 1:2])  # (R, S)
    h, w = image.shape[1:]
    inside = ((ys >= 0) & (ys <= h))[:, :, None] & ((xs >= 0) & (xs <= w))[:, None, :]  # (R, S, S)
    return regions * inside[:, None].to(regions.dtype)


def mirror_regions(regions: Tensor, flip: Tensor) -> Tensor:
    """Mirror warped regions horizontally, as Caffe's window data layer does for R-CNN's fine-tuning
    (``mirror: true``, each region with probability 1/2: the caller draws ``flip``).

    Args:
        regions (Tensor[B, 3, S, S]): warped regions.
        flip (Tensor[B] bool): which to mirror.

    Returns:
        Tensor[B, 3, S, S].
    """
    return torch.where(flip.to(regions.device)[:, None, None, None], regions.flip(3), regions)
