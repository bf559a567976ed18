"""Box maths shared by every pipeline: pure functions on float (N, 4) xyxy tensors.

Conventions (docs/design.md): boxes are (x1, y1, x2, y2) in 0-based pixels, width = x2 - x1;
RoIs for pooling are (K, 5) with the image index in column 0; image sizes are (H, W).
``box_iou`` is all-pairs: it gives (N, M).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou as _tv_box_iou

__all__ = [
    "box_iou",
    "boxes_to_rois",
    "clip_boxes",
    "decode_deltas",
    "dedup_rois",
    "encode_deltas",
    "flip_boxes",
    "min_side_keep",
    "unique_boxes",
]

# The largest log-scale delta decoded: a box may grow at most 1000 / 16 times its size in one step
# (exp() of more overflows the box for no benefit).
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """All-pairs IoU.

    Args:
        boxes1 (Tensor[N, 4]): xyxy boxes.
        boxes2 (Tensor[M, 4]): xyxy boxes.

    Returns:
        Tensor[N, M]: IoU of every pair; (N, 0) or (0, M) when a side is empty.
    """
    if boxes1.numel() == 0 or boxes2.numel() == 0:
        return boxes1.new_zeros((boxes1.shape[0], boxes2.shape[0]))
    return _tv_box_iou(boxes1, boxes2)


def _centres(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode_deltas(
    proposals: Tensor, targets: Tensor, stds: tuple[float, ...] = (1, 1, 1, 1)
) -> Tensor:
    """Regression targets that move each proposal onto its target box (R-CNN appendix C).

    dx = (gx - px) / pw / sx,  dy = (gy - py) / ph / sy,
    dw = log(gw / pw) / sw,    dh = log(gh / ph) / sh,
    with (px, py, pw, ph) the proposal's centre and size and (sx, sy, sw, sh) = ``stds``.

    Args:
        proposals (Tensor[N, 4]): xyxy boxes with positive width and height.
        targets (Tensor[N, 4]): xyxy boxes, one per proposal.
        stds (tuple of 4 floats): per-coordinate divisors (Fast R-CNN's target normalisation).

    Returns:
        Tensor[N, 4]: (dx, dy, dw, dh).
    """
    px, py, pw, ph = _centres(proposals)
    gx, gy, gw, gh = _centres(targets)
    deltas = torch.stack(
        ((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)), dim=1
    )
    return deltas / deltas.new_tensor(stds)


def decode_deltas(
    proposals: Tensor, deltas: Tensor, stds: tuple[float, ...] = (1, 1, 1, 1)
) -> Tensor:
    """Inverse of :func:`encode_deltas`: apply (dx, dy, dw, dh) to proposals.

    gx = px + pw * dx * sx,  gy = py + ph * dy * sy,
    gw = pw * exp(dw * sw),  gh = ph * exp(dh * sh).

    Args:
        proposals (Tensor[N, 4]): xyxy boxes.
        deltas (Tensor[N, 4] or Tensor[N, 4K]): deltas, one set or one per class.
        stds (tuple of 4 floats): the divisors used when encoding.

    Returns:
        Tensor with the shape of ``deltas``: decoded xyxy boxes.
    """
    n = deltas.shape[0]
    d = deltas.reshape(n, deltas.shape[1] // 4, 4) * deltas.new_tensor(stds)  # (N, K, 4)
    px, py, pw, ph = (t[:, None] for t in _centres(proposals.to(deltas.dtype)))
    cx = px + pw * d[..., 0]
    cy = py + ph * d[..., 1]
    w = pw * torch.exp(d[..., 2].clamp(max=_MAX_LOG_SCALE))
    h = ph * torch.exp(d[..., 3].clamp(max=_MAX_LOG_SCALE))
    out = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=2)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip xyxy boxes (any leading shape, last dim a multiple of 4) to an image of size (H, W)."""
    h, w = size
    shape = boxes.shape
    b = boxes.reshape(-1, 4)
    b = torch.stack(
        (b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)), dim=1
    )
    return b.reshape(shape)


def min_side_keep(boxes: Tensor, min_side: float) -> Tensor:
    """Tensor[N] bool: which boxes have both sides at least ``min_side`` pixels."""
    return ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)


def unique_boxes(boxes: Tensor) -> Tensor:
    """Indices (Tensor[U], ascending) of the first occurrence of each distinct box, order kept."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    _, inverse = torch.unique(boxes, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), boxes.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(boxes.shape[0]), reduce="amin")
    return first.sort().values


def dedup_rois(boxes: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Group the boxes that coincide once scaled by ``scale`` and rounded: RoI pooling at that spatial
    scale reads them from the same cells, so they pool to the same values (Fast R-CNN's DEDUP_BOXES).

    Halves round up, as torchvision's roi_pool rounds a non-negative coordinate (C's round()); the
    original hashed with NumPy's round-half-to-even, which can split a group pooling would merge.

    Args:
        boxes (Tensor[R, 4]): xyxy boxes with non-negative coordinates, in the pooled image's pixels.
        scale: the pooling's spatial scale (1/16).

    Returns:
        (Tensor[U], Tensor[R]): the index of each group's first box (ascending), and the group of each
        box, so that ``boxes[first][group]`` gives each box its group's first box.
    """
    r = boxes.shape[0]
    if r == 0:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return empty, empty
    x = boxes * scale
    keys = torch.where(x - x.floor() == 0.5, x.ceil(), x.round())
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    arange = torch.arange(r, device=boxes.device)
    first = torch.full((int(inverse.max()) + 1,), r, dtype=torch.long, device=boxes.device)
    first.scatter_reduce_(0, inverse, arange, reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=boxes.device)
    return first[order], rank[inverse]


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Stack per-image boxes into the (K, 5) RoI format that roi_pool/roi_align take.

    Args:
        boxes (list[Tensor[Ri, 4]]): boxes of image i in that image's (scaled) pixels.

    Returns:
        Tensor[sum Ri, 5]: (image index, x1, y1, x2, y2).
    """
    if not boxes:
        return torch.zeros((0, 5))
    idx = torch.cat([torch.full((b.shape[0], 1), i, dtype=b.dtype) for i, b in enumerate(boxes)])
    return torch.cat((idx.to(boxes[0].device), torch.cat(boxes)), dim=1)


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy boxes horizontally in an image ``width`` pixels wide: x -> width - x."""
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
