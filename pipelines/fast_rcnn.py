"""Fast R-CNN (Girshick, 2015): one conv feature map per image, RoI max pooling, joint training.

Shapes: N images in a batch, R RoIs, C trunk channels, P pooled side, D fc7 width, K classes.
    conv:       (N, 3, H, W) -> (N, C, H/16, W/16)
    roi_pool:   feature map, (R, 5) RoIs -> (R, C, P, P)       torchvision.ops.roi_pool, scale 1/16
    fc:         (R, C*P*P) -> fc7 (R, D)
    classifier: fc7 -> (R, K+1) logits -> softmax
    bbox_reg:   fc7 -> (R, 4K) class-specific deltas, normalised by ``bbox_stds``

Training: 2 images x 64 RoIs per mini-batch, 25% foreground (IoU >= 0.5), background IoU in
[0.1, 0.5), horizontal flips; loss = cross-entropy + smooth L1 on the foreground RoIs' deltas of their
true class; the whole net trained in one stage. Test: softmax scores, class-specific deltas, clip,
per-class NMS 0.3, at most 100 per class. Optional truncated SVD of fc6 and fc7 at test time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool

from pipelines.backbones import Backbone
from pipelines.boxes import boxes_to_rois, decode_deltas, encode_deltas, flip_boxes
from pipelines.detector import Detections, Detector, TrainData, candidates, normalize_image, select
from pipelines.registry import BuildContext, PaperFigures, register
from pipelines.sampling import Matches, match, sample_fg_bg, with_ground_truth
from pipelines.svd import compress_head
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig, run_sgd

__all__ = [
    "FastRCNN",
    "FastRCNNConfig",
    "HeadSettings",
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
]


@dataclass(frozen=True)
class FastRCNNConfig:
    """Fast R-CNN's settings; defaults are the paper's."""

    scale: int = 600  # shorter image side after resizing
    max_size: int = 1000  # longer side at most this
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(paper_iters=40000))
    images_per_batch: int = 2
    rois_per_image: int = 64
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: tuple[float, float] = (0.1, 0.5)
    flip: bool = True  # horizontal flips in training
    bbox_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)  # target normalisation
    bbox_loss_weight: float = 1.0
    score_thresh: float = 0.01  # softmax probability a (RoI, class) pair needs at test time
    nms_iou: float = 0.3
    max_per_class: int = 100
    svd_ranks: tuple[int, int] = (1024, 256)  # truncated SVD of fc6 and fc7 (the "svd" variant)


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


def detection_loss(
    logits: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor, bbox_weight: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Fast R-CNN's multi-task loss.

    L = CE(logits, labels) + bbox_weight * sum over foreground RoIs of smoothL1(deltas of the true
    class - targets), divided by the number of RoIs (the original's normalisation).

    Args:
        logits (Tensor[R, K+1]); deltas (Tensor[R, 4K]); labels (Tensor[R], 0 = background);
        targets (Tensor[R, 4]), normalised deltas (ignored for background rows).

    Returns:
        (classification loss, box loss), scalars.
    """
    cls_loss = F.cross_entropy(logits, labels)
    fg = torch.nonzero(labels > 0).flatten()
    if fg.numel() == 0:
        return cls_loss, deltas.sum() * 0.0
    per_class = deltas.reshape(deltas.shape[0], -1, 4)[fg, labels[fg] - 1]  # (F, 4)
    box_loss = F.smooth_l1_loss(per_class, targets[fg], beta=1.0, reduction="sum") / labels.numel()
    return cls_loss, bbox_weight * box_loss


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


def pool_rois(net: Backbone, features: Tensor, rois: Tensor) -> Tensor:
    """RoI max pooling: (N, C, h, w) map and (R, 5) RoIs in resized pixels -> (R, C, P, P)."""
    p = net.pool_size
    return roi_pool(features, rois, output_size=(p, p), spatial_scale=1.0 / net.stride)


def sample_rois(
    rois: Tensor, gt: Tensor, m: Matches, cfg: HeadSettings, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """One image's mini-batch of RoIs: ``rois_per_image`` drawn with ``fg_fraction`` foreground.

    Args:
        rois (Tensor[R, 4]): candidate RoIs; gt (Tensor[G, 4]): ground-truth boxes, in the same frame.
        m: each RoI's match to ``gt``.
        cfg: the sampling bands and the delta normalisation.
        gen: the random stream.

    Returns:
        labels (Tensor[B]), boxes (Tensor[B, 4]) and normalised delta targets (Tensor[B, 4], zero
        for background), foreground first.
    """
    fg, bg = sample_fg_bg(m.iou, cfg.rois_per_image, cfg.fg_fraction, cfg.fg_iou, cfg.bg_iou, gen)
    boxes = rois[torch.cat((fg, bg))]
    labels = torch.cat((m.labels[fg], torch.zeros(len(bg), dtype=torch.long)))
    targets = torch.zeros((len(boxes), 4))
    if len(fg):
        targets[: len(fg)] = encode_deltas(boxes[: len(fg)], gt[m.gt_index[fg]], cfg.bbox_stds)
    return labels, boxes, targets


def head_loss(
    net: Backbone,
    heads: tuple[nn.Linear, nn.Linear],
    features: Tensor,
    rois: Tensor,
    labels: Tensor,
    targets: Tensor,
    bbox_weight: float,
) -> Tensor:
    """The detection loss of a mini-batch of RoIs on a conv map: RoI pooling, fc6/fc7, the two heads.

    Args:
        net: the backbone whose head (fc6, fc7) runs on the pooled RoIs.
        heads: (cls_score, bbox_pred).
        features (Tensor[N, C, h, w]): the batch's conv maps.
        rois (Tensor[B, 5]): in the maps' image pixels; labels (Tensor[B]); targets (Tensor[B, 4]).
        bbox_weight: the box loss's weight.

    Returns:
        classification loss + box loss, a scalar.
    """
    fc7 = net(pool_rois(net, features, rois))
    cls_loss, box_loss = detection_loss(heads[0](fc7), heads[1](fc7), labels, targets, bbox_weight)
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
) -> Detections:
    """The test-time steps after the conv map: "roi_pool", "fc", "classifier" (softmax), "bbox_reg"
    (class-specific deltas), "nms".

    Args:
        net: the backbone (pool size and stride).
        fc_head: fc6 and fc7 (``net.head``, or its truncated-SVD copy).
        heads: (cls_score, bbox_pred).
        features (Tensor[1, C, h, w]): the image's conv map.
        proposals (Tensor[R, 4]): in image pixels.
        s: the factor the image was resized by.
        size: the image's (H, W).
        cfg: score threshold, delta normalisation, NMS overlap, detections kept per class.
        timer: receives the five stages.
    """
    with timer.stage("roi_pool"):
        pooled = pool_rois(net, features, boxes_to_rois([proposals.to(features.dtype) * s]))
    with timer.stage("fc"):
        fc7 = fc_head(pooled.flatten(1))
    with timer.stage("classifier"):
        probs = F.softmax(heads[0](fc7), dim=1)[:, 1:]  # (R, K)
        rows, cls = candidates(probs, cfg.score_thresh)
    with timer.stage("bbox_reg"):
        deltas = heads[1](fc7[rows]).reshape(len(rows), -1, 4)
        deltas = deltas[torch.arange(len(rows), device=deltas.device), cls]  # (M, 4)
        boxes = decode_deltas(proposals[rows], deltas, cfg.bbox_stds)
    with timer.stage("nms"):
        return select(boxes, probs[rows, cls], cls + 1, size, cfg.nms_iou, cfg.max_per_class)


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


@register
class FastRCNN(Detector):
    """Fast R-CNN behind the Detector interface: trains a copy of the shared backbone and its two
    sibling heads in one stage."""

    name = "fast_rcnn"
    label = "Fast R-CNN"
    config_class = FastRCNNConfig
    variants = ("svd",)
    train_stages = ("train", "svd")
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
        "Fast R-CNN paper, Table 4 (VGG16, K40 GPU, VOC07 test)",
        train_hours=9.5,
        test_seconds=0.32,
        voc07_map=66.9,
    )

    def __init__(self, cfg: FastRCNNConfig, context: BuildContext):
        super().__init__(cfg, context)
        backbone = context.backbone()
        self.net = backbone.to(self.device)
        self.cls_score, self.bbox_pred = (
            layer.to(self.device) for layer in new_heads(backbone.fc_dim, self.num_classes)
        )
        self.svd_head: nn.Sequential | None = None

    def _pool(self, features: Tensor, rois: Tensor) -> Tensor:
        """(N, C, h, w) map and (R, 5) RoIs in resized pixels -> (R, C, P, P)."""
        return pool_rois(self.net, features, rois)

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
        usable = images_in_band(matches, cfg.fg_iou, cfg.bg_iou, self.name)
        gen = torch.Generator().manual_seed(cfg.solver.seed)
        order: list[int] = []
        self.net.train()

        def loss_fn(_: int) -> Tensor:
            images, batch_rois, labels, targets = [], [], [], []
            for n in range(cfg.images_per_batch):
                i = draw_image(order, usable, gen)
                flip = cfg.flip and bool(torch.rand((), generator=gen) < 0.5)
                x, s = prepare_image(
                    torch.from_numpy(data.images[i]).to(self.device), cfg.scale, cfg.max_size, flip
                )
                lab, box, tgt = self._sample(
                    rois[i], gts[i], matches[i], gen, flip, data.images[i].shape[1]
                )
                images.append(x)
                batch_rois.append(torch.cat((torch.full((len(box), 1), float(n)), box * s), dim=1))
                labels.append(lab)
                targets.append(tgt)
            features = self.net.trunk(pad_images(images))
            return head_loss(
                self.net,
                (self.cls_score, self.bbox_pred),
                features,
                torch.cat(batch_rois).to(self.device),
                torch.cat(labels).to(self.device),
                torch.cat(targets).to(self.device),
                cfg.bbox_loss_weight,
            )

        with timer.stage("train"):
            params = [
                *self.net.parameters(),
                *self.cls_score.parameters(),
                *self.bbox_pred.parameters(),
            ]
            losses = run_sgd(params, cfg.solver, loss_fn, "fast r-cnn train")
        self.net.eval()
        with timer.stage("svd"):
            self.svd_head = compress_head(self.net.head, cfg.svd_ranks)
        return {"final_loss": float(np.mean(losses[-50:]))}

    def _sample(
        self, rois: Tensor, gt: Tensor, m: Matches, gen: torch.Generator, flip: bool, width: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One image's RoIs: labels (R,), boxes (R, 4) in original pixels (flipped if asked), and
        normalised delta targets (R, 4)."""
        if flip:
            rois, gt = flip_boxes(rois, width), flip_boxes(gt, width)
        return sample_rois(rois, gt, m, self.cfg, gen)

    def paper_schedule(self, stages_s: dict[str, float]) -> dict:
        return self.cfg.solver.paper_schedule(stages_s["train"], stages_s.get("svd", 0.0))

    # -- inference --------------------------------------------------------------------------------

    @torch.no_grad()
    def _detect(
        self, image: Tensor, proposals: Tensor, timer: StageTimer, variant: str | None
    ) -> Detections:
        cfg = self.cfg
        head = self.svd_head if variant == "svd" else self.net.head
        with timer.stage("preprocess"):
            x, s = prepare_image(image, cfg.scale, cfg.max_size)
        with timer.stage("conv"):
            features = self.net.trunk(x[None])
        size = (image.shape[0], image.shape[1])
        heads = (self.cls_score, self.bbox_pred)
        return head_detections(self.net, head, heads, features, proposals, s, size, cfg, timer)


def pad_images(images: list[Tensor]) -> Tensor:
    """Stack (3, h, w) images into (N, 3, H, W), zero (the mean colour) to the right and bottom."""
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    batch = images[0].new_zeros((len(images), 3, h, w))
    for n, x in enumerate(images):
        batch[n, :, : x.shape[1], : x.shape[2]] = x
    return batch
