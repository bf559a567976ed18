"""Faster R-CNN (Ren et al., 2015): a region proposal network on the shared conv map feeds Fast R-CNN's
head; both are trained together, so no selective search is needed.

Shapes: N images in a batch, C trunk channels, h x w conv map, A anchors per position (sizes x aspect
ratios, 3 x 3), R proposals, P pooled side, D fc7 width, K classes.
    conv:       (N, 3, H, W) -> (N, C, h, w), h = H/16, w = W/16
    rpn:        map -> 3x3 conv (C channels) -> objectness (N, A, h, w) and deltas (N, 4A, h, w);
                the h*w*A anchors moved by their deltas, the top ``pre_nms`` by objectness, clipped,
                NMS at 0.7, the top ``post_nms`` kept -> proposals (R, 4)
    roi_pool, fc, classifier, bbox_reg, nms: Fast R-CNN's head (parts.roi_head.head_detections)

The RPN is torchvision's (AnchorGenerator, RPNHead, RegionProposalNetwork). Its anchors are centred on
the top-left pixel of each 16-pixel cell (the original centres them at (7.5, 7.5)); training labels
anchors positive at IoU >= 0.7 with a ground-truth box, or when they are a box's best anchor, negative
below 0.3, and draws 256 per image, at most half positive; loss = binary cross-entropy on objectness +
smooth L1 (beta 1/9) on the positives' deltas. Unlike py-faster-rcnn it keeps anchors that cross the
image border in training and drops no proposal for being under 16 pixels.

Training (approximate joint training, py-faster-rcnn's end-to-end recipe): per SGD step
``images_per_batch`` images, each through the network alone and unpadded, their gradients accumulated
(py-faster-rcnn: one image per pass and two passes per step, iter_size 2), mirrored at random; the
trunk's first ``frozen_convs`` convolutions fixed (py-faster-rcnn: conv1_1 to conv2_2 of VGG16) and
biases at the solver's bias multiplier; loss = the RPN's two losses + Fast R-CNN's detection loss on 128
RoIs per image drawn from that image's proposals (detached: no gradient flows through the proposal
boxes) and its ground-truth boxes, 25% foreground (IoU >= 0.5), background in ``bg_iou``
(py-faster-rcnn's end-to-end recipe: [0, 0.5)). Settings from py-faster-rcnn: lib/fast_rcnn/config.py
(RPN_*, BATCH_SIZE 128), experiments/cfgs/faster_rcnn_end2end.yml (IMS_PER_BATCH 1, BG_THRESH_LO 0),
models/VGG16/faster_rcnn_end2end/solver.prototxt (lr 0.001, step 50k, iter_size 2),
experiments/scripts/faster_rcnn_end2end.sh (70k iterations on VOC07); pipelines/originals/faster_rcnn.py
lists each with file:line.
Test: the top 300 proposals after NMS, then Fast R-CNN's test steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from rcnn_bench.pipelines.context import BuildContext, PaperFigures
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.originals.faster_rcnn import FASTER_RCNN
from rcnn_bench.pipelines.parts.backbones import layer_multipliers
from rcnn_bench.pipelines.parts.batches import draw_image
from rcnn_bench.pipelines.parts.boxes import flip_boxes
from rcnn_bench.pipelines.parts.conv_map import conv_map, prepare_image
from rcnn_bench.pipelines.parts.detections import Detections, TrainData
from rcnn_bench.pipelines.parts.floors import ObjectFloor, conv_cell_floor
from rcnn_bench.pipelines.parts.roi_head import head_detections, head_loss, new_heads, sample_rois
from rcnn_bench.pipelines.parts.sampling import match, with_ground_truth
from rcnn_bench.pipelines.parts.training import SolverConfig, param_groups, run_sgd
from rcnn_bench.pipelines.registry import register
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

__all__ = ["FasterRCNN", "FasterRCNNConfig", "build_rpn", "propose"]


@dataclass(frozen=True)
class FasterRCNNConfig:
    """Faster R-CNN's settings; defaults are py-faster-rcnn's end-to-end VGG16 ones."""

    scale: int = 600  # shorter image side after resizing
    max_size: int = 1000  # longer side at most this
    solver: SolverConfig = field(
        default_factory=lambda: SolverConfig(paper_iters=70000, lr_step=50000)
    )
    frozen_convs: int = (
        0  # leading convolutions of the trunk not trained (4 for VGG16 in the original)
    )
    images_per_batch: int = 2  # per SGD step, one per forward pass (py-faster-rcnn: iter_size 2)
    use_difficult: bool = False  # difficult objects are training targets too (the original: false)
    new_lr_mult: float = 1.0  # the new layers' (RPN, cls_score, bbox_pred) learning-rate multiplier
    rois_per_image: int = 128
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: tuple[float, float] = (0.1, 0.5)
    flip: bool = True  # horizontal flips in training
    bbox_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)  # target normalisation
    bbox_loss_weight: float = 1.0
    score_thresh: float = 0.01  # softmax probability a (RoI, class) pair needs at test time
    nms_iou: float = 0.3
    max_per_class: int = 100
    # Anchors: sides in resized pixels (128, 256, 512 at a 600-pixel shorter side) and height/width.
    anchor_sizes: tuple[int, ...] = (128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_fg_iou: float = 0.7  # an anchor overlapping a ground-truth box this much is positive
    rpn_bg_iou: float = 0.3  # ... and one overlapping every box less than this negative
    rpn_batch: int = 256  # anchors drawn per image for the RPN's loss
    rpn_fg_fraction: float = 0.5  # at most this share of them positive
    rpn_nms_iou: float = 0.7
    rpn_pre_nms_train: int = 12000  # proposals kept before and after NMS, in training ...
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 6000  # ... and at test time
    rpn_post_nms_test: int = 300

    def __post_init__(self):
        if self.frozen_convs < 0:
            raise ValueError(f"frozen_convs must be >= 0, got {self.frozen_convs}")


def build_rpn(cfg: FasterRCNNConfig, channels: int) -> RegionProposalNetwork:
    """torchvision's region proposal network for one stride-16 map of ``channels`` channels, with
    ``cfg``'s anchors, sampling and NMS settings (its head's weights drawn from torch's global RNG)."""
    anchors = AnchorGenerator((cfg.anchor_sizes,), (cfg.aspect_ratios,))
    head = RPNHead(channels, len(cfg.anchor_sizes) * len(cfg.aspect_ratios))
    return RegionProposalNetwork(
        anchors,
        head,
        fg_iou_thresh=cfg.rpn_fg_iou,
        bg_iou_thresh=cfg.rpn_bg_iou,
        batch_size_per_image=cfg.rpn_batch,
        positive_fraction=cfg.rpn_fg_fraction,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_train, "testing": cfg.rpn_pre_nms_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_train, "testing": cfg.rpn_post_nms_test},
        nms_thresh=cfg.rpn_nms_iou,
    )


def propose(
    rpn: RegionProposalNetwork,
    batch: Tensor,
    sizes: list[tuple[int, int]],
    features: Tensor,
    gt_boxes: list[Tensor] | None = None,
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Run the RPN on a batch's conv map.

    Args:
        rpn: in training mode (``gt_boxes`` needed) or eval mode.
        batch (Tensor[N, 3, H, W]): the padded images, which set the anchors' stride (H // h).
        sizes: each image's (h, w) before padding; its proposals are clipped to it.
        features (Tensor[N, C, h, w]): the conv map.
        gt_boxes: per image, Tensor[G, 4] in the batch's pixels (training only).

    Returns:
        (per image, proposals Tensor[R, 4] in the batch's pixels, detached; the losses
        {"loss_objectness", "loss_rpn_box_reg"} in training, else {}).
    """
    targets = None if gt_boxes is None else [{"boxes": g} for g in gt_boxes]
    return rpn(ImageList(batch, sizes), {"0": features}, targets)


@register
class FasterRCNN(Detector):
    """Faster R-CNN behind the Detector interface: a copy of the shared backbone, torchvision's RPN on
    its conv map and Fast R-CNN's head, trained together; it never reads the shared proposals."""

    name = "faster_rcnn"
    label = "Faster R-CNN"
    config_class = FasterRCNNConfig
    originals = FASTER_RCNN
    owns_proposals = True
    train_stages = ("train",)
    stage_groups: ClassVar[dict[str, str]] = {
        "preprocess": "other",
        "conv": "conv",
        "rpn": "proposals",  # where selective search sits for the other pipelines
        "roi_pool": "per_region",
        "fc": "per_region",
        "classifier": "classifier",
        "bbox_reg": "classifier",
        "nms": "classifier",
    }
    paper: ClassVar[PaperFigures] = PaperFigures(
        "Faster R-CNN paper, Table 5 (VGG16, K40 GPU, VOC07 test); time includes proposals",
        test_seconds=0.198,
        voc07_map=69.9,
        end_to_end_seconds=0.198,  # its proposals are its own RPN's (Table 5: 198 ms in all)
    )

    def __init__(self, cfg: FasterRCNNConfig, context: BuildContext):
        super().__init__(cfg, context)
        backbone = context.backbone()
        self.net = backbone.to(self.device)
        self.cls_score, self.bbox_pred = (
            layer.to(self.device) for layer in new_heads(backbone.fc_dim, self.num_classes)
        )
        self.rpn = build_rpn(cfg, backbone.channels).to(self.device).eval()
        # As Fast R-CNN's: built here, so that a frozen_convs the trunk lacks fails before training.
        self.train_layers = [
            *layer_multipliers(self.net, cfg.frozen_convs),
            (self.rpn, cfg.new_lr_mult),
            (self.cls_score, cfg.new_lr_mult),
            (self.bbox_pred, cfg.new_lr_mult),
        ]
        distributed.check_split(cfg.images_per_batch, f"pipelines.{self.name}.images_per_batch")

    def test_modules(self, variant: str | None = None) -> list[nn.Module]:
        return [self.net, self.rpn, self.cls_score, self.bbox_pred]

    # -- training ---------------------------------------------------------------------------------

    def fit(self, data: TrainData, timer: StageTimer) -> dict:
        # Images whose objects are all difficult give the RPN no positive and the head no RoI.
        usable = [i for i in range(len(data.images)) if len(data.ground_truth(i)[0])]
        if not usable:
            raise ValueError(f"{self.name}: no training image has a non-difficult object")
        rpn_losses: list[float] = []
        self.net.train()
        self.rpn.train()
        params = param_groups(self.train_layers, self.cfg.solver)
        # The RPN draws its anchors with torch's global RNG: seed it for this run only.
        devices = [self.device] if self.device.type == "cuda" else []
        with timer.stage("train"), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.solver.seed + self.train_seed + distributed.rank())
            loss_fn = self._loss_fn(data, usable, rpn_losses)
            passes = len(distributed.share(self.cfg.images_per_batch))
            losses = run_sgd(params, self.cfg.solver, loss_fn, "faster r-cnn train", passes)
        self.net.eval()
        self.rpn.eval()
        return {
            "final_loss": float(np.mean(losses[-50:])),
            "final_rpn_loss": float(np.mean(rpn_losses[-50:])),
        }

    def _loss_fn(
        self, data: TrainData, usable: list[int], rpn_losses: list[float]
    ) -> Callable[[int], Tensor]:
        """One forward pass's loss for run_sgd, which makes one pass per image of this process's
        share of the mini-batch and accumulates their gradients; appends each pass's RPN loss to
        ``rpn_losses``.

        py-faster-rcnn runs one image per pass (IMS_PER_BATCH 1) and averages iter_size 2 passes per
        SGD step: each image goes through the network alone, unpadded, and its loss (RPN and head,
        each normalised over that image's samples) counts 1 / images_per_batch, so the step's loss
        is the mean of its images' losses. The whole mini-batch's images are drawn at its first
        pass in every process (one stream for all); under torchrun each process runs its share.
        The RPN's anchors (torch's global stream) and the head's RoIs are drawn from streams of
        each process's own, so training matches one process in batch size, not draw for draw.
        """
        cfg = self.cfg
        seed = cfg.solver.seed + self.train_seed
        gen = torch.Generator().manual_seed(seed)
        roi_gen = torch.Generator().manual_seed(seed + 1 + distributed.rank())
        order: list[int] = []
        mine = distributed.share(cfg.images_per_batch)
        pending: list[tuple[int, bool]] = []  # this process's (image, flipped) still to run

        def loss_fn(_: int) -> Tensor:
            if not pending:
                for n in range(cfg.images_per_batch):
                    i = draw_image(order, usable, gen)
                    flip = cfg.flip and bool(torch.rand((), generator=gen) < 0.5)
                    if n in mine:
                        pending.append((i, flip))
            i, flip = pending.pop(0)
            x, s = prepare_image(
                torch.from_numpy(data.images[i]).to(self.device), cfg.scale, cfg.max_size, flip
            )
            boxes, labels = data.ground_truth(i)
            if flip:
                boxes = flip_boxes(boxes, data.images[i].shape[1])
            features = self.net.trunk(x[None])
            gt = boxes * s
            proposals, losses = propose(
                self.rpn, x[None], [(x.shape[1], x.shape[2])], features, [gt.to(self.device)]
            )
            rois, labels, targets = self._sample(proposals, [gt], [labels], roi_gen)
            rpn_loss = losses["loss_objectness"] + losses["loss_rpn_box_reg"]
            rpn_losses.append(float(rpn_loss.detach()))
            head = head_loss(
                self.net,
                (self.cls_score, self.bbox_pred),
                features,
                rois.to(self.device),
                labels.to(self.device),
                targets.to(self.device),
                cfg.bbox_loss_weight,
            )
            return (head + rpn_loss) / cfg.images_per_batch

        return loss_fn

    def _sample(
        self,
        proposals: list[Tensor],
        gts: list[Tensor],
        gt_labels: list[Tensor],
        gen: torch.Generator,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The head's mini-batch from each image's proposals and ground truth (Fast R-CNN's sampler):
        RoIs (B, 5) with the image index in column 0, labels (B,), normalised delta targets (B, 4)."""
        rois, labels, targets = [], [], []
        for n, (props, gt, lab) in enumerate(zip(proposals, gts, gt_labels, strict=True)):
            candidates = with_ground_truth(props.cpu(), gt)
            m = match(candidates, gt, lab, self.cfg.fg_iou)
            lab_n, box_n, tgt_n = sample_rois(candidates, gt, m, self.cfg, gen)
            rois.append(torch.cat((torch.full((len(box_n), 1), float(n)), box_n), dim=1))
            labels.append(lab_n)
            targets.append(tgt_n)
        return torch.cat(rois), torch.cat(labels), torch.cat(targets)

    def paper_schedule(self, stages_s: dict[str, float]) -> dict:
        return self.cfg.solver.paper_schedule(stages_s["train"])

    def object_floor(self) -> ObjectFloor:
        return conv_cell_floor(self.name, self.net.stride, self.cfg.scale, self.cfg.max_size)

    # -- inference --------------------------------------------------------------------------------

    @torch.no_grad()
    def _detect(
        self, image: Tensor, proposals: Tensor | None, timer: StageTimer, variant: str | None
    ) -> Detections:
        if proposals is not None:
            raise ValueError(f"{self.name} makes its own proposals: pass None")
        cfg = self.cfg
        x, features, s = conv_map(self.net.trunk, image, cfg.scale, cfg.max_size, timer)
        with timer.stage("rpn"):
            boxes, _ = propose(self.rpn, x[None], [(x.shape[1], x.shape[2])], features)
            proposals = boxes[0] / s
        size = (image.shape[0], image.shape[1])
        heads = (self.cls_score, self.bbox_pred)
        return head_detections(
            self.net, self.net.head, heads, features, proposals, s, size, cfg, timer
        )
