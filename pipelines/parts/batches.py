"""What training mini-batches draw from, for every pipeline that samples regions: each training image's
regions and their matches to the ground truth (training_regions), the images a batch can use
(images_in_band), and an epoch's random order of them (draw_image).

Shapes: R regions of one image (ground truth first, then the shared proposals), G ground-truth boxes.
"""

from __future__ import annotations

import torch
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.parts.sampling import Matches, match, with_ground_truth
from torch import Tensor

__all__ = ["draw_image", "images_in_band", "training_regions"]


def training_regions(
    data: TrainData, fg_iou: float
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]], list[Matches]]:
    """Per image: the training regions (ground truth first, then the shared proposals), the ground
    truth (boxes, labels), and each region's match at ``fg_iou``; matched once and shared between
    fine-tuning and the feature cache."""
    rois, gts, matches = [], [], []
    for i, props in enumerate(data.proposals):
        gt_boxes, gt_labels = data.ground_truth(i)
        rois.append(with_ground_truth(torch.from_numpy(props), gt_boxes))
        gts.append((gt_boxes, gt_labels))
        matches.append(match(rois[i], gt_boxes, gt_labels, fg_iou))
    return rois, gts, matches


def images_in_band(
    matches: list[Matches], fg_iou: float, bg_iou: tuple[float, float], pipeline: str
) -> list[int]:
    """The training images with at least one RoI in the foreground or the background band: the others
    (only difficult objects, say) would give an empty batch.

    Raises:
        ValueError: there is none (the message names ``pipeline``).
    """
    usable = [
        i
        for i, m in enumerate(matches)
        if bool(((m.iou >= fg_iou) | ((m.iou >= bg_iou[0]) & (m.iou < bg_iou[1]))).any())
    ]
    if not usable:
        raise ValueError(f"{pipeline}: no training image has a foreground or background RoI")
    return usable


def draw_image(order: list[int], pool: list[int], gen: torch.Generator) -> int:
    """The next training image: ``pool`` visited in a fresh random order each epoch (``order`` holds
    what is left of the current epoch, and is consumed)."""
    if not order:
        order.extend(pool[j] for j in torch.randperm(len(pool), generator=gen).tolist())
    return order.pop()
