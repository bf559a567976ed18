"""Fast R-CNN (Girshick, 2015): one conv feature map per image, RoI max pooling, joint training.

Shapes: N images in a batch, R RoIs, C trunk channels, P pooled side, D fc7 width, K classes.
    conv:       (N, 3, H, W) -> (N, C, H/16, W/16)                 parts.conv_map
    roi_pool:   feature map, (R, 5) RoIs -> (R, C, P, P)       parts.roi_pool, scale 1/16
    fc:         (R, C*P*P) -> fc7 (R, D)                           parts.roi_head, from here on
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
R-CNN's SVM training and hard-negative mining, parts.svm_head.train_svm_head); both train after the
default model (``fit_variants``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from rcnn_bench.pipelines.context import BuildContext, PaperFigures
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.originals.fast_rcnn import FAST_RCNN
from rcnn_bench.pipelines.parts.backbones import Backbone, layer_multipliers
from rcnn_bench.pipelines.parts.batches import draw_image, images_in_band, training_regions
from rcnn_bench.pipelines.parts.boxes import boxes_to_rois, flip_boxes
from rcnn_bench.pipelines.parts.conv_map import conv_map, pad_images, prepare_image
from rcnn_bench.pipelines.parts.detections import Detections, TrainData
from rcnn_bench.pipelines.parts.floors import ObjectFloor, conv_cell_floor
from rcnn_bench.pipelines.parts.roi_head import (
    DeltaNorm,
    head_detections,
    head_loss,
    new_heads,
    regression_targets,
    sample_rois,
)
from rcnn_bench.pipelines.parts.roi_pool import pool_rois
from rcnn_bench.pipelines.parts.sampling import Matches
from rcnn_bench.pipelines.parts.scoring import TEST_TOPK
from rcnn_bench.pipelines.parts.svd import compress_head
from rcnn_bench.pipelines.parts.svm import SVMConfig
from rcnn_bench.pipelines.parts.svm_head import FeatureFn, SVMHead, SVMStageConfig, train_svm_head
from rcnn_bench.pipelines.parts.training import SolverConfig, param_groups, run_sgd
from rcnn_bench.pipelines.registry import register
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import Tensor, nn

__all__ = ["FastRCNN", "FastRCNNConfig", "svd_variant", "training_entries"]


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
    new_lr_mult: float = 1.0  # the new layers' (cls_score, bbox_pred) learning-rate multiplier
    use_difficult: bool = False  # difficult objects are training targets too (the original: true)
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


def training_entries(images: list[int], flip: str) -> list[int]:
    """What one epoch of training visits, each entry ``2 * image + mirrored``: every image once, and
    with ``flip`` "append" its mirrored copy too (the original doubles its image list,
    lib/datasets/imdb.py:94-110)."""
    mirrored = (0, 1) if flip == "append" else (0,)
    return [2 * i + m for i in images for m in mirrored]


@register
class FastRCNN(Detector):
    """Fast R-CNN behind the Detector interface: trains a copy of the shared backbone and its two
    sibling heads in one stage."""

    name = "fast_rcnn"
    label = "Fast R-CNN"
    config_class = FastRCNNConfig
    originals = FAST_RCNN
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
            (self.cls_score, cfg.new_lr_mult),
            (self.bbox_pred, cfg.new_lr_mult),
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
        rois, ground_truth, matches = training_regions(data, cfg.fg_iou)
        gts = [boxes for boxes, _ in ground_truth]
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
            svm_cfg = SVMStageConfig(svm=self.cfg.svm)
            regions = training_regions(data, self.cfg.fg_iou)
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
        gen = torch.Generator().manual_seed(cfg.solver.seed + self.train_seed)
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

    def object_floor(self) -> ObjectFloor:
        return conv_cell_floor(self.name, self.net.stride, self.cfg.scale, self.cfg.max_size)

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
            budget=self.test_budget(variant),
            norm=self.delta_norm,
            dedup=cfg.dedup_boxes,
            svms=svms,
        )
