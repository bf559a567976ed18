"""Fast R-CNN's RoI head, which Faster R-CNN runs on its own proposals: RoI pooling, fc6 and fc7, two
sibling layers (K+1-way scores, class-specific box deltas); the sampling of a mini-batch of RoIs and
their regression targets, the multi-task loss, and the test-time steps after the conv map.

Shapes: N images in a batch, R RoIs, C trunk channels, P pooled side, D fc7 width, K classes, M
candidate (RoI, class) pairs.
    roi_pool:   map (N, C, h, w), RoIs (R, 5) -> (R, C, P, P)        parts.roi_pool, scale 1/16
    fc:         (R, C*P*P) -> fc7 (R, D)
    classifier: fc7 -> cls_score (R, K+1) -> softmax (R, K) (or SVM scores (R, K)) -> candidates (M,)
    bbox_reg:   fc7 -> bbox_pred (R, 4K) -> the candidates' own class's deltas (M, 4), mapped back by
                DeltaNorm (or fixed standard deviations) -> boxes (M, 4)
    loss:       cross-entropy over the batch's RoIs + smooth L1 on the foreground RoIs' deltas of their
                true class, both over the batch's RoI count
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from rcnn_bench.pipelines.parts.backbones import Backbone
from rcnn_bench.pipelines.parts.boxes import boxes_to_rois, decode_deltas, dedup_rois, encode_deltas
from rcnn_bench.pipelines.parts.detections import Detections
from rcnn_bench.pipelines.parts.roi_pool import pool_rois
from rcnn_bench.pipelines.parts.sampling import Matches, sample_fg_bg
from rcnn_bench.pipelines.parts.scoring import ScoreBudget, candidates, select
from rcnn_bench.pipelines.parts.svm_head import SVMHead
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import Tensor, nn

__all__ = [
    "DeltaNorm",
    "HeadSettings",
    "detection_loss",
    "head_detections",
    "head_loss",
    "new_heads",
    "regression_targets",
    "sample_rois",
]


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
    """What the head's sampling, loss and test-time steps read from a pipeline's config
    (FastRCNNConfig, FasterRCNNConfig)."""

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
