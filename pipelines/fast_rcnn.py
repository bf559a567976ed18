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
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool

from pipelines.boxes import boxes_to_rois, decode_deltas, encode_deltas, flip_boxes
from pipelines.detector import Detections, Detector, TrainData, candidates, normalize_image, select
from pipelines.registry import BuildContext, PaperFigures, register
from pipelines.sampling import Matches, match, sample_fg_bg, with_ground_truth
from pipelines.svd import compress_head
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig, run_sgd

__all__ = ["FastRCNN", "FastRCNNConfig", "detection_loss", "prepare_image"]


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
        k = self.num_classes
        self.cls_score = nn.Linear(backbone.fc_dim, k + 1).to(self.device)
        self.bbox_pred = nn.Linear(backbone.fc_dim, 4 * k).to(self.device)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.svd_head: nn.Sequential | None = None

    def _pool(self, features: Tensor, rois: Tensor) -> Tensor:
        """(N, C, h, w) map and (R, 5) RoIs in resized pixels -> (R, C, P, P)."""
        p = self.net.pool_size
        return roi_pool(features, rois, output_size=(p, p), spatial_scale=1.0 / self.net.stride)

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
        # Images with no RoI in either band (only difficult objects, say) would give an empty batch.
        in_band = [
            (m.iou >= cfg.fg_iou) | ((m.iou >= cfg.bg_iou[0]) & (m.iou < cfg.bg_iou[1]))
            for m in matches
        ]
        usable = [i for i, band in enumerate(in_band) if bool(band.any())]
        if not usable:
            raise ValueError("fast_rcnn: no training image has a foreground or background RoI")
        gen = torch.Generator().manual_seed(cfg.solver.seed)
        order: list[int] = []
        self.net.train()

        def loss_fn(_: int) -> Tensor:
            images, batch_rois, labels, targets = [], [], [], []
            for n in range(cfg.images_per_batch):
                if not order:
                    order.extend(
                        usable[j] for j in torch.randperm(len(usable), generator=gen).tolist()
                    )
                i = order.pop()
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
            batch = _pad(images)
            features = self.net.trunk(batch)
            fc7 = self.net(self._pool(features, torch.cat(batch_rois).to(self.device)))
            cls_loss, box_loss = detection_loss(
                self.cls_score(fc7),
                self.bbox_pred(fc7),
                torch.cat(labels).to(self.device),
                torch.cat(targets).to(self.device),
                cfg.bbox_loss_weight,
            )
            return cls_loss + box_loss

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
        cfg = self.cfg
        fg, bg = sample_fg_bg(
            m.iou, cfg.rois_per_image, cfg.fg_fraction, cfg.fg_iou, cfg.bg_iou, gen
        )
        keep = torch.cat((fg, bg))
        boxes = rois[keep]
        labels = torch.cat((m.labels[fg], torch.zeros(len(bg), dtype=torch.long)))
        targets = torch.zeros((len(keep), 4))
        if len(fg):
            matched = gt[m.gt_index[fg]]
            src = boxes[: len(fg)]
            if flip:
                src, matched = flip_boxes(src, width), flip_boxes(matched, width)
            targets[: len(fg)] = encode_deltas(src, matched, cfg.bbox_stds)
        if flip:
            boxes = flip_boxes(boxes, width)
        return labels, boxes, targets

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
        with timer.stage("roi_pool"):
            pooled = self._pool(features, boxes_to_rois([proposals.to(x.dtype) * s]))
        with timer.stage("fc"):
            fc7 = head(pooled.flatten(1))
        with timer.stage("classifier"):
            probs = F.softmax(self.cls_score(fc7), dim=1)[:, 1:]  # (R, K)
            rows, cls = candidates(probs, cfg.score_thresh)
        with timer.stage("bbox_reg"):
            deltas = self.bbox_pred(fc7[rows]).reshape(len(rows), -1, 4)
            deltas = deltas[torch.arange(len(rows), device=deltas.device), cls]  # (M, 4)
            boxes = decode_deltas(proposals[rows], deltas, cfg.bbox_stds)
        with timer.stage("nms"):
            size = (image.shape[0], image.shape[1])
            return select(boxes, probs[rows, cls], cls + 1, size, cfg.nms_iou, cfg.max_per_class)


def _pad(images: list[Tensor]) -> Tensor:
    """Stack (3, h, w) images into (N, 3, H, W), zero (the mean colour) to the right and bottom."""
    h = max(x.shape[1] for x in images)
    w = max(x.shape[2] for x in images)
    batch = images[0].new_zeros((len(images), 3, h, w))
    for n, x in enumerate(images):
        batch[n, :, : x.shape[1], : x.shape[2]] = x
    return batch
