"""Reference checks: a trained Fast R-CNN run through torchvision's own detection parts, and a timing
loop that interleaves the runs it compares.

Shapes: R proposals, C trunk channels, P pooled side, D fc7 width, K classes (background 0).

The composition (``TorchvisionFastRCNN``) is torchvision's two-stage detector without its RPN:
GeneralizedRCNNTransform (normalize, resize) -> our trunk -> RoIHeads (box_roi_pool, box_head,
box_predictor, postprocess_detections) -> GeneralizedRCNNTransform.postprocess (boxes back to the
image's pixels). Only the modules are ours (trunk, fc head, the sibling layers' weights). It gives
FastRCNN.detect's detections when:

- ``test_topk`` is "fixed": RoIHeads keeps (RoI, class) pairs whose softmax probability is above
  ``score_thresh``, then per-class NMS, then the top ``detections_per_img`` over all classes; ours caps
  each class at ``max_per_class`` instead. ``detections_per_img`` is set to K * ``max_per_class``: the
  two agree whenever no class keeps ``max_per_class`` detections (a check should make sure).
- ``dedup_boxes`` is 0: the original's pooling of coinciding RoIs once (their group's first RoI's box
  regressed for all) has no counterpart in RoIHeads.
- the resized image's sides are whole numbers (H * s and W * s): the transform floors them and maps
  boxes back per axis, ours rounds them and uses the one factor s.

Where the parts differ in arithmetic (the results agree to float rounding): torchvision decodes every
(RoI, class) box and clips it before thresholding, ours only the candidates; it decodes in the resized
image and scales back, ours decodes in the image's pixels; the per-class target normalisation
(DeltaNorm) is folded into bbox_pred's weights, as the original does when it saves a model
(lib/fast_rcnn/train.py:54-65), instead of applied to the deltas; the fixed ``bbox_stds`` become
BoxCoder's weights 1 / std; RoIHeads drops boxes narrower than 0.01 pixel after clipping, ours only empty
ones.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.parts.backbones import IMAGENET_MEAN, IMAGENET_STD
from rcnn_bench.pipelines.parts.detections import Detections
from rcnn_bench.pipelines.parts.roi_head import DeltaNorm
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import roi_pool

__all__ = [
    "RoIMaxPool",
    "TorchvisionFastRCNN",
    "assert_same_detections",
    "folded_predictor",
    "interleaved_times",
    "wall_seconds",
]


class RoIMaxPool(nn.Module):
    """RoIHeads' ``box_roi_pool`` as Fast R-CNN pools: torchvision.ops.roi_pool on the one feature
    map (MultiScaleRoIAlign, torchvision's own, interpolates instead of taking maxima).

    Args:
        size: P.
        spatial_scale: 1 / the trunk's stride.
    """

    def __init__(self, size: int, spatial_scale: float):
        super().__init__()
        self.size = size
        self.spatial_scale = spatial_scale

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list
    ) -> Tensor:
        """(1, C, h, w) map under key "0" and per image (R, 4) boxes in its pixels -> (R, C, P, P)."""
        return roi_pool(features["0"], proposals, (self.size, self.size), self.spatial_scale)


class _Predictor(nn.Module):
    """RoIHeads' ``box_predictor``: fc7 (R, D) -> (class logits (R, K+1), deltas (R, 4(K+1)))."""

    def __init__(self, cls_score: nn.Linear, bbox_pred: nn.Linear):
        super().__init__()
        self.cls_score = cls_score
        self.bbox_pred = bbox_pred

    def forward(self, fc7: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(fc7), self.bbox_pred(fc7)


@torch.no_grad()
def folded_predictor(
    cls_score: nn.Linear,
    bbox_pred: nn.Linear,
    norm: DeltaNorm | None,
    bbox_stds: tuple[float, float, float, float],
) -> tuple[nn.Module, tuple[float, float, float, float]]:
    """Our two sibling layers as RoIHeads' box predictor, and the BoxCoder weights that decode its
    deltas as ours are decoded.

    RoIHeads wants 4 deltas per class background included (torchvision's layout, (R, 4(K+1))); the
    background's row block is zero. With ``norm`` the map back, delta = output * std[k] + mean[k], is
    folded into bbox_pred: W'[4k + j] = W[4k + j] * std[k, j], b'[4k + j] = b[4k + j] * std[k, j] +
    mean[k, j], and BoxCoder divides by 1; without it BoxCoder divides by 1 / ``bbox_stds``.

    Args:
        cls_score: D -> K+1 (used as it is); bbox_pred: D -> 4K.
        norm: the per-class target normalisation (FastRCNN.delta_norm), or None.
        bbox_stds: the fixed divisors used without ``norm``.

    Returns:
        (the predictor, BoxCoder weights (wx, wy, ww, wh)).
    """
    k4, d = bbox_pred.weight.shape
    weight, bias = bbox_pred.weight.detach().clone(), bbox_pred.bias.detach().clone()
    coder: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    if norm is None:
        coder = tuple(1.0 / s for s in bbox_stds)  # type: ignore[assignment]
    else:
        std, mean = norm.std.reshape(k4).to(weight), norm.mean.reshape(k4).to(weight)
        weight, bias = weight * std[:, None], bias * std + mean
    with_background = nn.Linear(d, k4 + 4).to(weight.device)
    with_background.weight.zero_()
    with_background.bias.zero_()
    with_background.weight[4:] = weight
    with_background.bias[4:] = bias
    return _Predictor(cls_score, with_background), coder


class TorchvisionFastRCNN(nn.Module):
    """A trained FastRCNN's trunk, fc head and sibling layers inside torchvision's detection parts
    (the module docstring says where the two agree).

    Args:
        det: the trained detector; its config must have ``test_topk`` "fixed" and ``dedup_boxes`` 0.

    Raises:
        ValueError: a setting the composition has no counterpart for.
    """

    def __init__(self, det: Detector):
        super().__init__()
        cfg = det.cfg
        if cfg.test_topk != "fixed" or cfg.dedup_boxes != 0:
            raise ValueError(
                "TorchvisionFastRCNN: RoIHeads matches Fast R-CNN with test_topk 'fixed' and "
                f"dedup_boxes 0, got test_topk {cfg.test_topk!r} and dedup_boxes {cfg.dedup_boxes}"
            )
        net = det.net
        # size_divisible 1: no padding, as ours runs the trunk on the resized image alone.
        self.transform = GeneralizedRCNNTransform(
            cfg.scale, cfg.max_size, list(IMAGENET_MEAN), list(IMAGENET_STD), size_divisible=1
        )
        self.trunk = net.trunk
        predictor, coder = folded_predictor(
            det.cls_score, det.bbox_pred, det.delta_norm, cfg.bbox_stds
        )
        self.roi_heads = RoIHeads(
            box_roi_pool=RoIMaxPool(net.pool_size, 1.0 / net.stride),
            box_head=nn.Sequential(nn.Flatten(), net.head),
            box_predictor=predictor,
            # The training-time sampler's settings: unused at test time.
            fg_iou_thresh=cfg.fg_iou,
            bg_iou_thresh=cfg.bg_iou[1],
            batch_size_per_image=cfg.rois_per_image,
            positive_fraction=cfg.fg_fraction,
            bbox_reg_weights=coder,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_iou,
            detections_per_img=cfg.max_per_class * det.num_classes,
        )
        self.eval()

    @torch.no_grad()
    def forward(self, image: Tensor, proposals: Tensor) -> Detections:
        """Detections of one image.

        Args:
            image: Tensor[H, W, 3] uint8 RGB; proposals: Tensor[R, 4] xyxy in its pixels, R >= 1.

        Returns:
            Detections on the CPU, highest score first.
        """
        original = (image.shape[0], image.shape[1])
        images, _ = self.transform([image.permute(2, 0, 1).float().div(255.0)])
        features = self.trunk(images.tensors)
        return self.detect_on(features, proposals, original, images.image_sizes[0])

    @torch.no_grad()
    def detect_on(
        self,
        features: Tensor,
        proposals: Tensor,
        original: tuple[int, int],
        resized: tuple[int, int],
    ) -> Detections:
        """The steps after the trunk: RoIHeads and the boxes mapped back to the image's pixels.

        Args:
            features (Tensor[1, C, h, w]): the resized image's conv map.
            proposals (Tensor[R, 4]): xyxy in the image's pixels, R >= 1.
            original: the image's (H, W); resized: the resized image's (h', w').
        """
        rois = [resize_boxes(proposals.float(), list(original), list(resized))]
        result, _ = self.roi_heads(OrderedDict([("0", features)]), rois, [resized])
        out = self.transform.postprocess(result, [resized], [original])[0]
        return Detections(out["boxes"].cpu(), out["scores"].cpu(), out["labels"].cpu())


def assert_same_detections(theirs: Detections, ours: Detections, box_atol: float) -> None:
    """The composition's detections are ours: the same labels in the same order, the same scores bit
    for bit (the same logits through the same softmax), boxes within ``box_atol`` pixels (decoded in
    another frame and scaled back).

    Raises:
        AssertionError: naming the first difference.
    """
    torch.testing.assert_close(theirs.labels, ours.labels, rtol=0, atol=0)
    torch.testing.assert_close(theirs.scores, ours.scores, rtol=0, atol=0)
    torch.testing.assert_close(theirs.boxes, ours.boxes, rtol=0, atol=box_atol)


def interleaved_times(
    measures: dict[str, Callable[[], float]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time several things fairly on a shared machine: each round runs every measure once, in turn,
    so that a slow spell (another process, a frequency change) hits all of them alike, and the order
    reverses every round, as the harness's pipelines alternate: what one measure leaves behind (the
    allocator's free blocks, the caches) must not favour the one after it (measured: R-CNN's conv+fc
    at 65 ms run first, the same forward run second at 54 ms; alternating, 63 and 62).

    Args:
        measures: name -> a function that runs the thing once and returns the seconds it took (by
            its own clock: the whole call, or the stages that matter).
        rounds: timed rounds, after ``warmup`` untimed ones.

    Returns:
        name -> its ``rounds`` times in seconds, in the order run.
    """
    times: dict[str, list[float]] = {name: [] for name in measures}
    order = list(measures.items())
    for r in range(warmup + rounds):
        for name, measure in order if r % 2 == 0 else order[::-1]:
            seconds = measure()
            if r >= warmup:
                times[name].append(seconds)
    return times


def wall_seconds(fn: Callable[[], object]) -> Callable[[], float]:
    """A measure for ``interleaved_times``: the wall time of one call of ``fn``."""

    def measure() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return measure
