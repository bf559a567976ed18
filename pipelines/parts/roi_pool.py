"""RoI max pooling on a conv map: Fast R-CNN's RoI pooling layer (which Faster R-CNN's head reuses) and
each level of SPPnet's pyramid, by torchvision's roi_pool in any precision.

Shapes: N images, C channels, h x w the map, R RoIs, P the pooled side, s the map's scale (1/16).
    roi_max_pool: (N, C, h, w) map, (R, 5) RoIs (image index, x1, y1, x2, y2 in image pixels) ->
                  (R, C, P, P), each RoI's box scaled by s and split into P x P bins, max per bin
"""

from __future__ import annotations

from rcnn_bench.pipelines.parts.backbones import Backbone
from torch import Tensor
from torchvision.ops import roi_pool

__all__ = ["pool_rois", "roi_max_pool"]


def roi_max_pool(features: Tensor, rois: Tensor, size: int, spatial_scale: float) -> Tensor:
    """torchvision's RoI max pooling in any precision: (N, C, h, w) maps and (R, 5) RoIs ->
    (R, C, size, size) in the maps' dtype. Under autocast the maps may be 16-bit; torchvision's CPU
    kernel has no bf16, so the pooling runs in float32 as torchvision's own autocast rule does on CUDA
    (a max picks one value: the result is the same)."""
    pooled = roi_pool(
        features.float(), rois.float(), output_size=(size, size), spatial_scale=spatial_scale
    )
    return pooled.to(features.dtype)


def pool_rois(net: Backbone, features: Tensor, rois: Tensor) -> Tensor:
    """RoI max pooling: (N, C, h, w) map and (R, 5) RoIs in resized pixels -> (R, C, P, P)."""
    return roi_max_pool(features, rois, net.pool_size, 1.0 / net.stride)
