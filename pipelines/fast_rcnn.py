"""Fast R-CNN (Girshick, 2015): one conv feature map per image, RoI max pooling, joint training.

Shapes: N images in a batch, R RoIs, C trunk channels, P pooled side, D fc7 width, K classes.
    conv:       (N, 3, H, W) -> (N, C, H/16, W/16)
    roi_pool:   feature map, (R, 5) RoIs -> (R, C, P, P)       torchvision.ops.roi_pool, scale 1/16
    fc:         (R, C*P*P) -> fc7 (R, D)
    classifier: fc7 -> (R, K+1) logits -> softmax
    bbox_reg:   fc7 -> (R, 4K) class-specific deltas, normalised (DeltaNorm)

Training: 2 images x 64 RoIs per mini-batch, 25% foreground (IoU >= 0.5), background IoU in
[0.1, 0.5), a mirrored copy of every image appended to the training set; loss = cross-entropy + smooth
L1 on the foreground RoIs' deltas of their true class, the targets normalised by per-class means and
standard deviations; the net trained in one stage but for its first convolutions, biases at twice the
rate without weight decay. Test: RoIs that coincide on the conv map pooled once, softmax scores, the
originals' adaptive per-class candidate budget (or a fixed threshold), class-specific deltas, clip,
per-class NMS 0.3.

Variants: truncated SVD of fc6 and fc7 at each rank pair of ``svd_ranks`` ("svd_<fc6>_<fc7>", the
paper's section 3.1), and post-hoc SVMs on fc7 in place of the softmax ("svm", the paper's section 5.4:
R-CNN's SVM training and hard-negative mining, pipelines.rcnn.train_svm_head); both train after the
default model (``fit_variants``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool

from pipelines import distributed
from pipelines.backbones import Backbone, layer_multipliers
from pipelines.boxes import boxes_to_rois, decode_deltas, dedup_rois, encode_deltas, flip_boxes
from pipelines.detector import (
    TEST_TOPK,
    Detections,
    Detector,
    ScoreBudget,
    TrainData,
    candidates,
    normalize_image,
    select,
    test_time_rows,
)
from pipelines.fidelity import FAST_RCNN_REPO, Setting, setting
from pipelines.rcnn import FeatureFn, RCNNConfig, SVMHead, train_svm_head, training_regions
from pipelines.registry import BuildContext, PaperFigures, register
from pipelines.sampling import Matches, match, sample_fg_bg, with_ground_truth
from pipelines.svd import compress_head
from pipelines.svm import SVMConfig
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig, param_groups, run_sgd, solver_rows

__all__ = [
    "DeltaNorm",
    "FastRCNN",
    "FastRCNNConfig",
    "HeadSettings",
    "conv_map",
    "detection_loss",
    "draw_image",
    "head_detections",
    "head_loss",
    "images_in_band",
    "new_heads",
    "pad_images",
    "pool_rois",
    "prepare_image",
    "sample_rois",
    "svd_variant",
    "training_entries",
]


# The paper's solver (models/VGG16/solver.prototxt:2-10, tools/train_net.py:33-35; CaffeNet's is the
# same): lr 0.001 divided by 10 at 30k of 40k iterations; biases at 2x without weight decay
# (models/VGG16/train.prototxt:147-150).
PAPER_SOLVER = SolverConfig(
    paper_iters=40000, lr=1e-3, lr_step=30000, bias_lr_mult=2.0, bias_decay=False
)

FLIPS = ("random", "append", "none")
BBOX_NORMALIZE = ("fixed", "per_class")


@dataclass(frozen=True)
class FastRCNNConfig:
    """Fast R-CNN's settings; defaults are the paper's, but for ``frozen_convs``, which depends on the
    network (the paper configs set it: 4 for VGG16, 1 for AlexNet)."""

    scale: int = 600  # shorter image side after resizing
    max_size: int = 1000  # longer side at most this
    solver: SolverConfig = field(default_factory=lambda: PAPER_SOLVER)
    frozen_convs: int = 0  # leading convolutions of the trunk not trained
    images_per_batch: int = 2
    rois_per_image: int = 64
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: tuple[float, float] = (0.1, 0.5)
    flip: str = "append"  # "append" a mirrored copy of each image, "random" (p 1/2), or "none"
    bbox_normalize: str = "per_class"  # targets by per-class mean and std, or "fixed" bbox_stds
    bbox_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)  # "fixed" only
    bbox_loss_weight: float = 1.0
    dedup_boxes: float = 0.0625  # 1/16: test RoIs equal at this scale pooled once (0: off)
    test_topk: str = "adaptive"  # test-time candidates: "adaptive" budget or "fixed" threshold
    max_per_image: int = 100  # "adaptive": candidates per class and image, before NMS
    max_per_set_factor: int = 40  # "adaptive": candidates per class over a pass, per image
    score_thresh: float = 0.01  # "fixed": softmax probability a (RoI, class) pair needs
    max_per_class: int = 100  # "fixed": detections kept per class and image, after NMS
    nms_iou: float = 0.3
    # Ranks of fc6 and fc7 in each truncated-SVD variant (the paper's 1024 and 256 of 4096, and
    # twice and half those)
    svd_ranks: tuple[tuple[int, int], ...] = ((2048, 512), (1024, 256), (512, 128))
    svm: SVMConfig = field(default_factory=SVMConfig)  # the "svm" variant's (R-CNN's) mining
    svm_score_thresh: float = -1.1  # "fixed", "svm" variant: the SVM score a pair needs (R-CNN's)
    variants: tuple[str, ...] = ("all",)  # the test-time variants to train, time and score

    def __post_init__(self):
        for key, allowed in (
            ("flip", FLIPS),
            ("bbox_normalize", BBOX_NORMALIZE),
            ("test_topk", TEST_TOPK),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.frozen_convs < 0 or self.dedup_boxes < 0:
            raise ValueError("frozen_convs and dedup_boxes must be >= 0")
        if any(rank < 1 for ranks in self.svd_ranks for rank in ranks):
            raise ValueError(f"svd_ranks must be >= 1, got {[list(r) for r in self.svd_ranks]}")
        if len(set(self.svd_ranks)) != len(self.svd_ranks):
            raise ValueError(f"svd_ranks lists a pair twice: {[list(r) for r in self.svd_ranks]}")


def svd_variant(ranks: tuple[int, int]) -> str:
    """The name of the truncated-SVD variant with fc6 and fc7 at ``ranks``: "svd_1024_256"."""
    return "svd_" + "_".join(str(r) for r in ranks)


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
    s = min(scale / min(h, w), max_size / max(h, w))
    if abs(s - 1.0) > 1e-6:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    return x, s


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


def detection_loss(
    logits: Tensor,
    deltas: Tensor,
    labels: Tensor,
    targets: Tensor,
    bbox_weight: float = 1.0,
    count: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fast R-CNN's multi-task loss.

    L = (sum over RoIs of CE(logits, labels) + bbox_weight * sum over foreground RoIs of
    smoothL1(deltas of the true class - targets)) / count, count being the mini-batch's RoIs (the
    original's normalisation).

    Args:
        logits (Tensor[R, K+1]); deltas (Tensor[R, 4K]); labels (Tensor[R], 0 = background);
        targets (Tensor[R, 4]), normalised deltas (ignored for background rows).
        bbox_weight: the box loss's weight.
        count: the RoIs of the whole mini-batch when these R are one process's share of it (the
            shares' losses then add up to the batch's); None: R.

    Returns:
        (classification loss, box loss), scalars.
    """
    count = labels.numel() if count is None else count
    cls_loss = F.cross_entropy(logits, labels, reduction="sum") / count
    fg = torch.nonzero(labels > 0).flatten()
    if fg.numel() == 0:
        return cls_loss, deltas.sum() * 0.0
    per_class = deltas.reshape(deltas.shape[0], -1, 4)[fg, labels[fg] - 1]  # (F, 4)
    box_loss = F.smooth_l1_loss(per_class, targets[fg], beta=1.0, reduction="sum") / count
    return cls_loss, bbox_weight * box_loss


# A coordinate whose targets all agree to within this (one example, say) is left unscaled: its
# normalised targets are 0 whatever the divisor.
_MIN_STD = 1e-6


@dataclass(frozen=True)
class DeltaNorm:
    """Per-class normalisation of the box-regression targets (lib/roi_data_layer/roidb.py:55-78): a
    RoI of class c regresses (delta - mean[c]) / std[c]; at test time the head's output is mapped back
    (the original folds the same map into bbox_pred's weights when it saves them,
    lib/fast_rcnn/train.py:54-65).

    Attributes:
        mean: Tensor[K, 4]; std: Tensor[K, 4], positive.
    """

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, deltas: Tensor, labels: Tensor, num_classes: int) -> DeltaNorm:
        """Per-class means and (population) standard deviations.

        Args:
            deltas (Tensor[N, 4]): the training RoIs' targets; labels (Tensor[N]): their classes 1..K.
            num_classes: K. A class without targets gets mean 0 and std 1.
        """
        onehot = F.one_hot(labels - 1, num_classes).double().T  # (K, N)
        count = onehot.sum(1, keepdim=True).clamp(min=1)
        d = deltas.double()
        mean = onehot @ d / count
        std = (onehot @ d.square() / count - mean.square()).clamp(min=0).sqrt()  # E[x^2] - E[x]^2
        std = torch.where(std > _MIN_STD, std, 1.0)
        return cls(mean.float(), std.float())

    def normalize(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """Targets (Tensor[N, 4]) of RoIs of classes ``labels`` (Tensor[N], 1..K), normalised."""
        return (deltas - self.mean[labels - 1]) / self.std[labels - 1]

    def denormalize(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """The inverse of ``normalize``: what the head predicts for classes ``labels``, as deltas."""
        return deltas * self.std[labels - 1] + self.mean[labels - 1]

    def to(self, device: torch.device) -> DeltaNorm:
        return DeltaNorm(self.mean.to(device), self.std.to(device))


def regression_targets(
    rois: list[Tensor], gts: list[Tensor], matches: list[Matches], mirrored: bool
) -> tuple[Tensor, Tensor]:
    """Every training RoI's box-regression target and class, over which DeltaNorm is fitted: the RoIs
    matched to a ground-truth box (IoU >= the foreground threshold, the ground truth itself included,
    as lib/roi_data_layer/roidb.py:88-101).

    Args:
        rois: per image, its RoIs (Tensor[R, 4]); gts: its ground-truth boxes (Tensor[G, 4]);
            matches: the RoIs' matches to them.
        mirrored: add the targets of the mirrored copies (dx changes sign): the original appends
            the flipped images (lib/fast_rcnn/train.py:103-108) before it computes the statistics
            (lib/fast_rcnn/train.py:31-33).

    Returns:
        (Tensor[N, 4], Tensor[N]): the targets and their classes 1..K.
    """
    deltas, labels = [torch.zeros((0, 4))], [torch.zeros(0, dtype=torch.long)]
    for r, gt, m in zip(rois, gts, matches, strict=True):
        fg = torch.nonzero(m.labels > 0).flatten()
        deltas.append(encode_deltas(r[fg], gt[m.gt_index[fg]]))
        labels.append(m.labels[fg])
    d, lab = torch.cat(deltas), torch.cat(labels)
    if mirrored:
        d, lab = torch.cat((d, d * d.new_tensor([-1.0, 1.0, 1.0, 1.0]))), torch.cat((lab, lab))
    return d, lab


class HeadSettings(Protocol):
    """What the Fast R-CNN head's sampling, loss and test-time steps read from a pipeline's config
    (FastRCNNConfig, and the pipelines that reuse the head)."""

    rois_per_image: int
    fg_fraction: float
    fg_iou: float
    bg_iou: tuple[float, float]
    bbox_stds: tuple[float, float, float, float]
    bbox_loss_weight: float
    score_thresh: float
    nms_iou: float
    max_per_class: int


def new_heads(fc_dim: int, num_classes: int) -> tuple[nn.Linear, nn.Linear]:
    """The two sibling layers on fc7, initialised as the original: cls_score (D -> K+1, std 0.01) and
    bbox_pred (D -> 4K, std 0.001), zero biases."""
    cls_score = nn.Linear(fc_dim, num_classes + 1)
    bbox_pred = nn.Linear(fc_dim, 4 * num_classes)
    nn.init.normal_(cls_score.weight, std=0.01)
    nn.init.normal_(bbox_pred.weight, std=0.001)
    nn.init.zeros_(cls_score.bias)
    nn.init.zeros_(bbox_pred.bias)
    return cls_score, bbox_pred


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


def sample_rois(
    rois: Tensor,
    gt: Tensor,
    m: Matches,
    cfg: HeadSettings,
    gen: torch.Generator,
    norm: DeltaNorm | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One image's mini-batch of RoIs: ``rois_per_image`` drawn with ``fg_fraction`` foreground.

    Args:
        rois (Tensor[R, 4]): candidate RoIs; gt (Tensor[G, 4]): ground-truth boxes, in the same frame.
        m: each RoI's match to ``gt``.
        cfg: the sampling bands (and ``bbox_stds``, without ``norm``).
        gen: the random stream.
        norm: the per-class target normalisation; None: divide by the fixed ``bbox_stds``.

    Returns:
        labels (Tensor[B]), boxes (Tensor[B, 4]) and normalised delta targets (Tensor[B, 4], zero
        for background), foreground first.
    """
    fg, bg = sample_fg_bg(m.iou, cfg.rois_per_image, cfg.fg_fraction, cfg.fg_iou, cfg.bg_iou, gen)
    boxes = rois[torch.cat((fg, bg))]
    labels = torch.cat((m.labels[fg], torch.zeros(len(bg), dtype=torch.long)))
    targets = torch.zeros((len(boxes), 4))
    if len(fg):
        matched = gt[m.gt_index[fg]]
        if norm is None:
            targets[: len(fg)] = encode_deltas(boxes[: len(fg)], matched, cfg.bbox_stds)
        else:
            targets[: len(fg)] = norm.normalize(
                encode_deltas(boxes[: len(fg)], matched), m.labels[fg]
            )
    return labels, boxes, targets


def head_loss(
    net: Backbone,
    heads: tuple[nn.Linear, nn.Linear],
    features: Tensor,
    rois: Tensor,
    labels: Tensor,
    targets: Tensor,
    bbox_weight: float,
    count: int | None = None,
) -> Tensor:
    """The detection loss of a mini-batch of RoIs on a conv map: RoI pooling, fc6/fc7, the two heads.

    Args:
        net: the backbone whose head (fc6, fc7) runs on the pooled RoIs.
        heads: (cls_score, bbox_pred).
        features (Tensor[N, C, h, w]): the batch's conv maps.
        rois (Tensor[B, 5]): in the maps' image pixels; labels (Tensor[B]); targets (Tensor[B, 4]).
        bbox_weight: the box loss's weight.
        count: the whole mini-batch's RoIs when these are one process's share (detection_loss).

    Returns:
        classification loss + box loss, a scalar.
    """
    fc7 = net(pool_rois(net, features, rois))
    logits, deltas = heads[0](fc7), heads[1](fc7)
    cls_loss, box_loss = detection_loss(logits, deltas, labels, targets, bbox_weight, count)
    return cls_loss + box_loss


@torch.no_grad()
def head_detections(
    net: Backbone,
    fc_head: nn.Module,
    heads: tuple[nn.Linear, nn.Linear],
    features: Tensor,
    proposals: Tensor,
    s: float,
    size: tuple[int, int],
    cfg: HeadSettings,
    timer: StageTimer,
    budget: ScoreBudget | None = None,
    norm: DeltaNorm | None = None,
    dedup: float = 0.0,
    svms: tuple[SVMHead, float] | None = None,
) -> Detections:
    """The test-time steps after the conv map: "roi_pool", "fc", "classifier" (softmax, or SVM
    scores, and the candidate (RoI, class) pairs), "bbox_reg" (class-specific deltas), "nms".

    Args:
        net: the backbone (pool size and stride).
        fc_head: fc6 and fc7 (``net.head``, or its truncated-SVD copy).
        heads: (cls_score, bbox_pred).
        features (Tensor[1, C, h, w]): the image's conv map.
        proposals (Tensor[R, 4]): in image pixels.
        s: the factor the image was resized by.
        size: the image's (H, W).
        cfg: NMS overlap; without ``budget``, the score threshold and detections kept per class;
            without ``norm``, ``bbox_stds``.
        timer: receives the five stages.
        budget: the originals' adaptive candidate budget (Detector.test_budget); None: the fixed
            ``score_thresh``, and at most ``max_per_class`` per class after NMS.
        norm: the per-class target normalisation the head's deltas are mapped back with.
        dedup: > 0: the RoIs that coincide once scaled by this and rounded are pooled once, and each
            takes its group's first RoI's scores and regressed boxes (lib/fast_rcnn/test.py:173-179,
            203-206); 0: off.
        svms: SVMs on fc7 that score the RoIs in place of the softmax (the "svm" variant), with the
            score a candidate needs without a budget; None: the softmax and ``cfg.score_thresh``.
    """
    with timer.stage("roi_pool"):
        rois = proposals.to(features.dtype) * s
        first, group = dedup_rois(rois, dedup) if dedup > 0 else (None, None)
        pooled = pool_rois(net, features, boxes_to_rois([rois if first is None else rois[first]]))
    with timer.stage("fc"):
        fc7 = fc_head(pooled.flatten(1))
    with timer.stage("classifier"):
        if svms is None:
            probs, thresh = F.softmax(heads[0](fc7), dim=1)[:, 1:], cfg.score_thresh  # (U, K)
        else:
            head, thresh = svms
            probs = (fc7 * head.fc7_scale) @ head.weight + head.bias  # (U, K)
        if group is not None:
            probs = probs[group]  # (R, K): back to every RoI
        if budget is None:
            rows, cls = candidates(probs, thresh)
        else:
            rows, cls = budget.candidates(probs)
    with timer.stage("bbox_reg"):
        pooled_rows = rows if group is None else group[rows]
        origins = (proposals if first is None else proposals[first])[pooled_rows]
        boxes = _regressed_boxes(heads[1], fc7[pooled_rows], origins, cls, cfg, norm)
    with timer.stage("nms"):
        cap = cfg.max_per_class if budget is None else budget.max_per_image
        return select(boxes, probs[rows, cls], cls + 1, size, cfg.nms_iou, cap)


def _regressed_boxes(
    bbox_pred: nn.Linear,
    fc7: Tensor,
    origins: Tensor,
    cls: Tensor,
    cfg: HeadSettings,
    norm: DeltaNorm | None,
) -> Tensor:
    """Each candidate's box: ``bbox_pred``'s deltas of its class, mapped back by ``norm`` (None: the
    fixed ``bbox_stds``), applied to its RoI.

    Args:
        bbox_pred: D -> 4K.
        fc7 (Tensor[M, D]); origins (Tensor[M, 4]): the RoIs, in image pixels; cls (Tensor[M]): the
            candidates' classes, 0-based.
        cfg: gives ``bbox_stds``.
        norm: the per-class target normalisation.

    Returns:
        Tensor[M, 4].
    """
    deltas = bbox_pred(fc7).reshape(
        len(cls), bbox_pred.out_features // 4, 4
    )  # (M, K, 4), M may be 0
    deltas = deltas[torch.arange(len(cls), device=deltas.device), cls]  # (M, 4)
    if norm is None:
        return decode_deltas(origins, deltas, cfg.bbox_stds)
    return decode_deltas(origins, norm.denormalize(deltas, cls + 1))


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


def training_entries(images: list[int], flip: str) -> list[int]:
    """What one epoch of training visits, each entry ``2 * image + mirrored``: every image once, and
    with ``flip`` "append" its mirrored copy too (the original doubles its image list,
    lib/datasets/imdb.py:94-110)."""
    mirrored = (0, 1) if flip == "append" else (0,)
    return [2 * i + m for i in images for m in mirrored]


def draw_image(order: list[int], pool: list[int], gen: torch.Generator) -> int:
    """The next training image: ``pool`` visited in a fresh random order each epoch (``order`` holds
    what is left of the current epoch, and is consumed)."""
    if not order:
        order.extend(pool[j] for j in torch.randperm(len(pool), generator=gen).tolist())
    return order.pop()


@register
class FastRCNN(Detector):
    """Fast R-CNN behind the Detector interface: trains a copy of the shared backbone and its two
    sibling heads in one stage."""

    name = "fast_rcnn"
    label = "Fast R-CNN"
    config_class = FastRCNNConfig
    variants = ("svm",)  # and a truncated-SVD variant per rank pair (offered_variants)
    # Fast R-CNN paper (Girshick 2015): Table 8 (VGG16, VOC07 test) for the classifiers; section 3.1 and
    # Figure 2 for the SVD (fc6 at 1024 and fc7 at 256 of 4096: 66.9 -> 66.6 mAP, 30% faster).
    variant_papers: ClassVar[dict[str, str]] = {
        "default": "66.9 (Fast R-CNN paper, Table 8: softmax; VGG16, VOC07 test)",
        "svm": "66.8 (Fast R-CNN paper, Table 8: SVM; VGG16)",
        "svd_1024_256": "66.6 (Fast R-CNN paper, section 3.1 and Figure 2; VGG16)",
    }
    train_stages = ("train",)
    fixed_stages = ("svd",)  # each SVD variant's: as long on any data
    stage_groups: ClassVar[dict[str, str]] = {
        "preprocess": "other",
        "conv": "conv",
        "roi_pool": "per_region",
        "fc": "per_region",
        "classifier": "classifier",
        "bbox_reg": "classifier",
        "nms": "classifier",
    }
    paper: ClassVar[PaperFigures] = PaperFigures(
        "Fast R-CNN paper, Table 4 (VGG16, K40 GPU, VOC07 test); with selective search: Faster "
        "R-CNN paper, Table 5",
        train_hours=9.5,
        test_seconds=0.32,
        voc07_map=66.9,
        end_to_end_seconds=1.83,  # selective search 1.51 s + Fast R-CNN 0.32 s (Table 5)
    )

    def __init__(self, cfg: FastRCNNConfig, context: BuildContext):
        super().__init__(cfg, context)
        backbone = context.backbone()
        self.net = backbone.to(self.device)
        self.cls_score, self.bbox_pred = (
            layer.to(self.device) for layer in new_heads(backbone.fc_dim, self.num_classes)
        )
        # The trunk's first frozen_convs convolutions do not train; the rest, the fc head and the new
        # layers train at 1x (models/VGG16/train.prototxt:21-28 for conv1_1, 466-473 and 491-498 for
        # the new layers). Built here, so that a frozen_convs the trunk lacks fails before training.
        self.train_layers = [
            *layer_multipliers(self.net, cfg.frozen_convs),
            (self.cls_score, 1.0),
            (self.bbox_pred, 1.0),
        ]
        self.delta_norm: DeltaNorm | None = None  # fitted in fit() for bbox_normalize "per_class"
        distributed.check_split(cfg.images_per_batch, f"pipelines.{self.name}.images_per_batch")
        self.svd_heads: dict[str, nn.Sequential] = {}  # per SVD variant, fitted in fit_variants()
        self.svms: SVMHead | None = None  # the "svm" variant's, fitted in fit_variants()
        self.cache_dir = Path(context.cache_dir)  # the "svm" variant's feature cache

    @classmethod
    def offered_variants(cls, cfg: FastRCNNConfig) -> tuple[str, ...]:
        return (*cls.variants, *(svd_variant(r) for r in cfg.svd_ranks))

    @classmethod
    def cache_bytes(
        cls,
        cfg: FastRCNNConfig,
        train_images: int,
        regions_per_image: int,
        backbone: Backbone,
        free_bytes: int | None = None,
    ) -> int:
        """The "svm" variant's feature cache: fc7 of every training RoI, in float16."""
        if "svm" not in cls.chosen_variants(cfg):
            return 0
        return 2 * train_images * regions_per_image * backbone.fc_dim

    def _fc_head(self, variant: str | None) -> nn.Module:
        """fc6 and fc7 as ``variant`` runs them: the trained head, or its truncated-SVD copy."""
        return self.svd_heads[variant] if variant in self.svd_heads else self.net.head

    def test_modules(self, variant: str | None = None) -> list[nn.Module]:
        # The "svm" variant scores with its SVMs: cls_score does not run.
        scorer = [] if variant == "svm" else [self.cls_score]
        return [self.net.trunk, self._fc_head(variant), *scorer, self.bbox_pred]

    def test_tensors(self, variant: str | None = None) -> list[Tensor]:
        """The per-class target means and standard deviations the test-time deltas are mapped back
        with (none for fixed ``bbox_stds``), and the "svm" variant's SVMs."""
        norm = [] if self.delta_norm is None else [self.delta_norm.mean, self.delta_norm.std]
        svms = self.svms.tensors() if variant == "svm" and self.svms else []
        return norm + svms

    # -- training ---------------------------------------------------------------------------------

    def fit(self, data: TrainData, timer: StageTimer) -> dict:
        cfg = self.cfg
        rois, gts, matches = [], [], []
        for i, props in enumerate(data.proposals):
            gt_boxes, gt_labels = data.ground_truth(i)
            r = with_ground_truth(torch.from_numpy(props), gt_boxes)
            rois.append(r)
            gts.append(gt_boxes)
            matches.append(match(r, gt_boxes, gt_labels, cfg.fg_iou))
        norm = None
        if cfg.bbox_normalize == "per_class":
            targets = regression_targets(rois, gts, matches, mirrored=cfg.flip != "none")
            norm = DeltaNorm.fit(*targets, self.num_classes)
        with timer.stage("train"):
            losses = self._train(data, (rois, gts, matches), norm)
        self.delta_norm = None if norm is None else norm.to(self.device)
        self.net.eval()
        return {"final_loss": float(np.mean(losses[-50:]))}

    def fit_variants(self, data: TrainData, timer: StageTimer) -> dict:
        """Each enabled SVD variant's truncated head ("<variant>/svd"), and the "svm" variant's SVMs
        on fc7 of every training RoI, by R-CNN's SVM stage ("svm/features", "svm/svm"; the box
        deltas stay the network's)."""
        info = {}
        for ranks in self.cfg.svd_ranks:
            variant = svd_variant(ranks)
            if variant in self.enabled_variants():
                stages = StageTimer(self.device)
                with stages.stage("svd"):
                    self.svd_heads[variant] = compress_head(self.net.head, ranks)
                timer.add(stages, variant)
        if "svm" in self.enabled_variants():
            # R-CNN's settings (feature scaling, negatives' overlap) with this block's SVM solver.
            svm_cfg = RCNNConfig(svm=self.cfg.svm)
            regions = training_regions(data, svm_cfg.fg_iou)
            work = self.cache_dir / f"fast_rcnn_svm-features-{id(self):x}-work-{os.getpid()}"
            stages = StageTimer(self.device)
            head, info["svm"] = train_svm_head(
                self._fc7_of(data), self.net.fc_dim, data, regions, svm_cfg, work, stages, False
            )
            timer.add(stages, "svm")
            self.svms = head.to(self.device)
        return info

    def _fc7_of(self, data: TrainData) -> FeatureFn:
        """fc7 of a training image's RoIs (and no box-regression features), as at test time."""

        @torch.no_grad()
        def fc7_of(i: int, boxes: Tensor) -> tuple[Tensor, Tensor]:
            image = torch.from_numpy(data.images[i]).to(self.device)
            x, s = prepare_image(image, self.cfg.scale, self.cfg.max_size)
            rois = boxes_to_rois([boxes.to(self.device) * s])
            fc7 = self.net.head(pool_rois(self.net, self.net.trunk(x[None]), rois).flatten(1))
            return fc7, fc7[:, :0]

        return fc7_of

    def _train(
        self,
        data: TrainData,
        regions: tuple[list[Tensor], list[Tensor], list[Matches]],
        norm: DeltaNorm | None,
    ) -> list[float]:
        """SGD over mini-batches of ``images_per_batch`` images (mirrored as ``flip`` says) and their
        sampled RoIs.

        Args:
            data: the training split.
            regions: per image, its RoIs (ground truth first), ground-truth boxes and the matches.
            norm: the per-class target normalisation (None: the fixed ``bbox_stds``).

        Returns:
            The loss of every iteration.
        """
        cfg = self.cfg
        rois, gts, matches = regions
        usable = images_in_band(matches, cfg.fg_iou, cfg.bg_iou, self.name)
        entries = training_entries(usable, cfg.flip)
        gen = torch.Generator().manual_seed(cfg.solver.seed)
        order: list[int] = []
        mine = distributed.share(cfg.images_per_batch)  # this process's images of each batch
        self.net.train()

        def loss_fn(_: int) -> Tensor:
            images, batch_rois, labels, targets, count = [], [], [], [], 0
            # Every process draws the whole batch (one random stream) and prepares every image (the
            # batch is padded to their common size); it runs the network on its share.
            for n in range(cfg.images_per_batch):
                i, mirrored = divmod(draw_image(order, entries, gen), 2)
                flip = bool(mirrored)
                if cfg.flip == "random":
                    flip = bool(torch.rand((), generator=gen) < 0.5)
                x, s = prepare_image(
                    torch.from_numpy(data.images[i]).to(self.device), cfg.scale, cfg.max_size, flip
                )
                lab, box, tgt = self._sample(
                    rois[i], gts[i], matches[i], gen, flip, data.images[i].shape[1], norm
                )
                images.append(x)
                count += len(lab)
                if n in mine:
                    index = torch.full((len(box), 1), float(mine.index(n)))
                    batch_rois.append(torch.cat((index, box * s), dim=1))
                    labels.append(lab)
                    targets.append(tgt)
            features = self.net.trunk(pad_images(images)[mine])
            return head_loss(
                self.net,
                (self.cls_score, self.bbox_pred),
                features,
                torch.cat(batch_rois).to(self.device),
                torch.cat(labels).to(self.device),
                torch.cat(targets).to(self.device),
                cfg.bbox_loss_weight,
                count,
            )

        groups = param_groups(self.train_layers, cfg.solver)
        return run_sgd(groups, cfg.solver, loss_fn, "fast r-cnn train")

    def _sample(
        self,
        rois: Tensor,
        gt: Tensor,
        m: Matches,
        gen: torch.Generator,
        flip: bool,
        width: int,
        norm: DeltaNorm | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One image's RoIs: labels (R,), boxes (R, 4) in original pixels (flipped if asked), and
        delta targets (R, 4) normalised by ``norm`` (None: the fixed ``bbox_stds``)."""
        if flip:
            rois, gt = flip_boxes(rois, width), flip_boxes(gt, width)
        return sample_rois(rois, gt, m, self.cfg, gen, norm)

    def paper_schedule(self, stages_s: dict[str, float]) -> dict:
        return self.cfg.solver.paper_schedule(stages_s["train"])

    # -- inference --------------------------------------------------------------------------------

    @torch.no_grad()
    def _detect(
        self, image: Tensor, proposals: Tensor, timer: StageTimer, variant: str | None
    ) -> Detections:
        cfg = self.cfg
        _, features, s = conv_map(self.net.trunk, image, cfg.scale, cfg.max_size, timer)
        size = (image.shape[0], image.shape[1])
        heads = (self.cls_score, self.bbox_pred)
        svms = (self.svms, cfg.svm_score_thresh) if variant == "svm" else None
        return head_detections(
            self.net,
            self._fc_head(variant),
            heads,
            features,
            proposals,
            s,
            size,
            cfg,
            timer,
            budget=self.test_budget(),
            norm=self.delta_norm,
            dedup=cfg.dedup_boxes,
            svms=svms,
        )

    @classmethod
    def fidelity(cls, cfg: FastRCNNConfig) -> list[Setting]:
        """Fast R-CNN's training and test-time settings beside rbgirshick/fast-rcnn's (VGG16)."""
        repo = FAST_RCNN_REPO
        solver, net = f"{repo} models/VGG16/solver.prototxt", f"{repo} models/VGG16/train.prototxt"
        config, test = f"{repo} lib/fast_rcnn/config.py", f"{repo} lib/fast_rcnn/test.py"
        iters = f"{repo} tools/train_net.py:33-35"
        originals = {
            "lr": (0.001, f"{solver}:2"),
            "lr_step": (30000, f"{solver}:3-5"),
            "momentum": (0.9, f"{solver}:9"),
            "weight_decay": (0.0005, f"{solver}:10"),
            "iters": (40000, iters),
            "paper_iters": (40000, iters),
            "bias_lr_mult": (2.0, f"{net}:147-150"),
            "bias_decay": (False, f"{net}:147-150"),
        }
        # The row sees this block only, not the backbone: either network's count is a match.
        frozen = Setting(
            "fast_rcnn",
            "leading conv layers frozen",
            "4 with VGG16 (conv1_1-conv2_2), 1 with CaffeNet (conv1)",
            f"{net}:21-28,46-53,82-89,107-114, models/CaffeNet/train.prototxt:21-28",
            str(cfg.frozen_convs),
            "match" if cfg.frozen_convs in (4, 1) else "deviation",
        )
        rows = [
            setting("fast_rcnn", name, original, source, value)
            for name, original, source, value in (
                ("new layers' learning-rate multiplier", 1.0, f"{net}:466-473,491-498", 1.0),
                ("shorter side (px)", 600, f"{config}:38", cfg.scale),
                ("longer side at most (px)", 1000, f"{config}:41", cfg.max_size),
                ("images per batch", 2, f"{config}:44", cfg.images_per_batch),
                ("RoIs per image", 64, f"{config}:47 (128 over 2 images)", cfg.rois_per_image),
                ("foreground fraction", 0.25, f"{config}:50", cfg.fg_fraction),
                ("background IoU band", (0.1, 0.5), f"{config}:57-58", cfg.bg_iou),
                ("training flips", "append", f"{config}:61, lib/datasets/imdb.py:94-110", cfg.flip),
                (
                    "box-target normalisation",
                    "per_class",
                    f"{repo} lib/roi_data_layer/roidb.py:55-78",
                    cfg.bbox_normalize,
                ),
                (
                    "duplicate RoIs pooled once (scale)",
                    1 / 16,
                    f"{config}:114, lib/fast_rcnn/test.py:173-179",
                    cfg.dedup_boxes,
                ),
            )
        ]
        test_rows = test_time_rows(
            "fast_rcnn",
            cfg,
            {
                "rule": f"{test}:251-317",
                "per_image": f"{test}:254-255,288",
                "per_set": f"{test}:251-253",
                "threshold": f"{test}:258,284,316 (a rising per-class threshold only)",
                "nms": f"{config}:96, lib/fast_rcnn/test.py:324",
            },
        )
        return [*solver_rows("fast_rcnn", cfg.solver, originals), frozen, *rows, *test_rows]


def pad_images(images: list[Tensor]) -> Tensor:
    """Stack (3, h, w) images into (N, 3, H, W), zero (the mean colour) to the right and bottom."""
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    batch = images[0].new_zeros((len(images), 3, h, w))
    for n, x in enumerate(images):
        batch[n, :, : x.shape[1], : x.shape[2]] = x
    return batch
