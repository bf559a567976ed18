"""SPPnet (He et al., 2014) as the Fast R-CNN paper compares it: one conv map per image, a spatial pyramid
pooled per region, fc layers fine-tuned above frozen conv layers, then R-CNN's SVMs and box regressors.

Shapes: R regions of one image, C trunk channels, L pyramid bins (1 + 4 + 9 + 36 = 50 for levels
{1, 2, 3, 6}), E fc6 width, D fc7 width, K classes.
    conv:       (1, 3, H, W) -> (1, C, H/16, W/16)     the shared trunk, frozen
    spp:        map, (R, 5) RoIs -> (R, C*L)           torchvision.ops.roi_pool at l x l for each level l,
                                                       scale 1/16, each flattened (C, l, l), level by level
    fc:         (R, C*L) -> fc6 (R, E) -> fc7 (R, D)
    classifier: fc7 * scale -> SVM scores (R, K)
    bbox_reg:   pyramid * scale of the kept boxes -> moved boxes

fc6: the backbone's fc6 takes C*P*P pool5 inputs and the pyramid gives C*L, so SPPnet has its own fc6: a
new Linear(C*L, E), weights kaiming-normal from a generator seeded with ``fc6_seed`` and a zero bias (the
original's fc6 was trained on ImageNet on top of the pyramid; no such weights exist here). Everything
after fc6 (its ReLU, fc7, dropout) is the shared head's.

Training stages: "pretrain" (only with ``pretrain_iters`` > 0) is a pre-training of the conv layers on
this pipeline's own detection loss (the loss below with the trunk trained too, conv maps computed
afresh); its time is recorded but left out of the paper-schedule hours. It was the CPU default's
stand-in for ImageNet before the harness pre-trained the shared backbone for every pipeline
(``backbone.pretrain``, benchmarks/pretrain.py), and is kept for a backbone that starts from random
weights: random conv features are nearly useless frozen (SPPnet then scores about 0.01 mAP on the
default data). "conv" then runs the
frozen trunk once over the training images and keeps the maps in memory (float16, like R-CNN's feature
cache; about 2 MB per VGG16 image at 600 pixels): from here on the conv layers never change, which is
SPPnet's speed and its limit. "finetune" trains fc6, fc7 and a K+1 softmax layer on
RoIs sampled as Fast R-CNN's mini-batches (2 images x 64, 25% foreground at IoU >= 0.5, background in
[0.1, 0.5); no flips, so one map per image). "features", "svm", "bbox_reg" are R-CNN's
(parts.svm_head.train_svm_head): SVMs on fc7, box regressors on the pyramid (as R-CNN uses pool5).
Test: as R-CNN's, on SPP features, at one scale (Fast R-CNN's prepare_image and scale settings).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from rcnn_bench.pipelines.context import BuildContext, PaperFigures
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.originals.sppnet import SPPNET
from rcnn_bench.pipelines.parts.backbones import Backbone
from rcnn_bench.pipelines.parts.batches import draw_image, images_in_band, training_regions
from rcnn_bench.pipelines.parts.boxes import boxes_to_rois
from rcnn_bench.pipelines.parts.conv_map import conv_map, prepare_image
from rcnn_bench.pipelines.parts.detections import Detections, TrainData
from rcnn_bench.pipelines.parts.floors import ObjectFloor, conv_cell_floor
from rcnn_bench.pipelines.parts.roi_pool import roi_max_pool
from rcnn_bench.pipelines.parts.sampling import Matches, sample_fg_bg
from rcnn_bench.pipelines.parts.svm import SVMConfig
from rcnn_bench.pipelines.parts.svm_head import (
    REGION_BYTES,
    SVMHead,
    check_features,
    svm_cache_bytes,
    svm_detections,
    train_svm_head,
)
from rcnn_bench.pipelines.parts.training import SolverConfig, param_groups, run_sgd
from rcnn_bench.pipelines.registry import register
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import Tensor, nn

__all__ = ["SPPnet", "SPPnetConfig", "spatial_pyramid_pool", "spp_head"]


@dataclass(frozen=True)
class SPPnetConfig:
    """SPPnet's settings; defaults are the paper's where it gives them, Fast R-CNN's scale otherwise."""

    scale: int = 600  # shorter image side after resizing
    max_size: int = 1000  # longer side at most this
    levels: tuple[int, ...] = (1, 2, 3, 6)  # pyramid levels: l x l bins each
    use_difficult: bool = False  # difficult objects are training targets too (the original: true)
    fc6_seed: int = 0  # seeds the new fc6's initial weights (plus the run's seed)
    # Iterations of conv pre-training on the training split before the trunk is frozen, for a shared
    # backbone that starts from random weights (0: none; backbone.pretrain is the shared stand-in).
    pretrain_iters: int = 0
    # He et al. fine-tune 250k mini-batches at lr 1e-4, then 50k at 1e-5.
    solver: SolverConfig = field(
        default_factory=lambda: SolverConfig(paper_iters=300000, lr=1e-4, lr_steps=(250000,))
    )
    images_per_batch: int = 2
    rois_per_image: int = 64
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: tuple[float, float] = (0.1, 0.5)
    feature_norm: float = 20.0  # features are scaled so their mean L2 norm is this
    svm: SVMConfig = field(default_factory=SVMConfig)
    svm_neg_iou: float = 0.3  # SVM negatives overlap every box of the class less than this
    bbox_lambda: float = 1000.0  # ridge penalty
    bbox_min_iou: float = 0.6  # box-regression examples overlap a ground-truth box more than this
    score_thresh: float = -1.1  # SVM score a (region, class) pair needs to be kept at test time
    nms_iou: float = 0.3
    max_per_class: int = 100
    keep_feature_cache: bool = False  # keep the on-disk fc7/pyramid cache after training
    variants: tuple[str, ...] = ("all",)  # the test-time variants to time and score
    features: str = "disk"  # training fc7: "disk" (a cache), "none" (recomputed to mine), "auto"

    def __post_init__(self):
        check_features(self.features)


def spatial_pyramid_pool(
    features: Tensor, rois: Tensor, levels: tuple[int, ...], stride: int
) -> Tensor:
    """Spatial pyramid pooling of RoIs: max pooling into l x l bins for each level l.

    Args:
        features (Tensor[N, C, h, w]): conv maps.
        rois (Tensor[R, 5]): (image index, x1, y1, x2, y2) in the maps' image pixels.
        levels: the pyramid's levels.
        stride: the maps' stride in pixels (16).

    Returns:
        Tensor[R, C * sum(l * l)]: each level's (C, l, l) bins flattened, the levels concatenated in
        the order given.
    """
    scale = 1.0 / stride
    pooled = [roi_max_pool(features, rois, lv, scale) for lv in levels]
    return torch.cat([p.flatten(1) for p in pooled], dim=1)


def spp_head(head: nn.Sequential, in_features: int, seed: int) -> nn.Sequential:
    """``head`` with its first Linear (fc6) replaced by a new one taking ``in_features`` inputs.

    The new fc6 keeps the old one's width; its weights are kaiming-normal (ReLU gain) from a generator
    seeded with ``seed``, its bias zero. The other layers are ``head``'s own modules (not copies).
    """
    layers = list(head)
    i = next(n for n, m in enumerate(layers) if isinstance(m, nn.Linear))
    fc6 = nn.Linear(in_features, layers[i].out_features)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_normal_(fc6.weight, nonlinearity="relu", generator=gen)
        nn.init.zeros_(fc6.bias)
    layers[i] = fc6
    return nn.Sequential(*layers)


@register
class SPPnet(Detector):
    """SPPnet behind the Detector interface: the shared trunk frozen, its own fc6, fine-tuned fc layers,
    R-CNN's SVMs and box regressors on SPP features."""

    name = "sppnet"
    label = "SPPnet"
    config_class = SPPnetConfig
    originals = SPPNET
    variants = ("no_bbox_reg",)
    train_stages = (
        "pretrain",
        "conv",
        "finetune",
        "features",
        "svm",
        "bbox_reg",
    )  # pretrain: if set
    stage_groups: ClassVar[dict[str, str]] = {
        "preprocess": "other",
        "conv": "conv",
        "spp": "per_region",
        "fc": "per_region",
        "classifier": "classifier",
        "bbox_reg": "classifier",
        "nms": "classifier",
    }
    paper: ClassVar[PaperFigures] = PaperFigures(
        "Fast R-CNN paper, Table 4 (VGG16, K40 GPU, VOC07 test)",
        train_hours=25.0,
        test_seconds=2.3,
        voc07_map=63.1,
    )

    def __init__(self, cfg: SPPnetConfig, context: BuildContext):
        super().__init__(cfg, context)
        backbone = context.backbone()
        self.trunk = backbone.trunk.to(self.device).eval().requires_grad_(False)
        self.stride = backbone.stride
        self.fc_dim = backbone.fc_dim
        width = backbone.channels * sum(lv * lv for lv in cfg.levels)
        self.head = spp_head(backbone.head, width, cfg.fc6_seed + self.train_seed).to(self.device)
        self.cls = nn.Linear(self.fc_dim, self.num_classes + 1).to(self.device)  # fine-tuning
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)
        self.cache_dir = Path(context.cache_dir)
        self.svms: SVMHead | None = None
        distributed.check_split(cfg.images_per_batch, f"pipelines.{self.name}.images_per_batch")

    def test_modules(self, variant: str | None = None) -> list[nn.Module]:
        return [self.trunk, self.head]  # the fine-tuning classifier does not run at test time

    def test_tensors(self, variant: str | None = None) -> list[Tensor]:
        return self.svms.tensors(with_regressors=variant != "no_bbox_reg") if self.svms else []

    @classmethod
    def cache_bytes(
        cls,
        cfg: SPPnetConfig,
        train_images: int,
        regions_per_image: int,
        backbone: Backbone,
        free_bytes: int | None = None,
    ) -> int:
        """fc7 of every training region (unless ``features`` keeps none) and the pyramid of the
        box-regression examples, in float16 (parts.svm_head.svm_cache_bytes)."""
        pyramid = backbone.channels * sum(lv * lv for lv in cfg.levels)
        regions = train_images * regions_per_image
        return svm_cache_bytes(cfg.features, regions, backbone.fc_dim, pyramid, free_bytes)

    @classmethod
    def train_ram_bytes(
        cls, cfg: SPPnetConfig, train_images: int, regions_per_image: int, backbone: Backbone
    ) -> int:
        """The float16 conv maps of the training images (at most C x scale/16 x max_size/16 each) and
        the training regions (parts.svm_head.REGION_BYTES each)."""
        side = backbone.stride
        map_bytes = 2 * backbone.channels * -(-cfg.scale // side) * -(-cfg.max_size // side)
        return train_images * (map_bytes + regions_per_image * REGION_BYTES)

    @classmethod
    def iteration_stages(cls, cfg: SPPnetConfig) -> dict[str, int]:
        """Fine-tuning runs the solver's iterations, the conv pre-training (if any) its own."""
        pretrain = {"pretrain": cfg.pretrain_iters} if cfg.pretrain_iters else {}
        return {**pretrain, "finetune": cfg.solver.iters}

    @classmethod
    def with_iterations(cls, cfg: SPPnetConfig, iters: int) -> SPPnetConfig:
        return replace(
            cfg,
            pretrain_iters=min(iters, cfg.pretrain_iters),
            solver=replace(cfg.solver, iters=iters),
        )

    def _pyramid(self, features: Tensor, boxes: Tensor) -> Tensor:
        """(1, C, h, w) map and (R, 4) boxes in its image's pixels -> (R, C*L)."""
        rois = boxes_to_rois([boxes.to(features.dtype)])
        return spatial_pyramid_pool(features, rois, self.cfg.levels, self.stride)

    @torch.no_grad()
    def _conv_map(self, image: np.ndarray) -> tuple[Tensor, float]:
        """The frozen trunk's map of one training image, float16 on the CPU, and its resize factor."""
        x, s = prepare_image(
            torch.from_numpy(image).to(self.device), self.cfg.scale, self.cfg.max_size
        )
        return self.trunk(x[None]).half().cpu(), s

    # -- training ---------------------------------------------------------------------------------

    def fit(self, data: TrainData, timer: StageTimer) -> dict:
        cfg = self.cfg
        regions = training_regions(data, cfg.fg_iou)
        info = {}
        if cfg.pretrain_iters:
            with timer.stage("pretrain"):
                info["pretrain_final_loss"] = self._pretrain(data, regions[0], regions[2])
        with timer.stage("conv"):
            # Under torchrun the processes compute the maps in turn and share them.
            conv_map = distributed.in_rounds(
                lambda i: self._conv_map(data.images[i]), len(data.images)
            )
            maps = [conv_map(i) for i in range(len(data.images))]

        def cached(i: int) -> tuple[Tensor, float]:
            return maps[i][0].to(self.device).float(), maps[i][1]

        with timer.stage("finetune"):
            params = param_groups([(self.head, 1.0), (self.cls, 1.0)], cfg.solver)
            losses = self._softmax_sgd(
                cached, regions[0], regions[2], params, cfg.solver, "sppnet fine-tune"
            )

        @torch.no_grad()
        def extract(i: int) -> tuple[Tensor, Tensor]:
            features, s = cached(i)
            pyramid = self._pyramid(features, regions[0][i].to(self.device) * s)
            return self.head(pyramid).cpu(), pyramid.cpu()

        extracted = distributed.in_rounds(extract, len(data.images))  # as R-CNN's

        def features_of(i: int, boxes: Tensor) -> tuple[Tensor, Tensor]:
            return extracted(i)  # cache_features asks for image i's training regions

        work = self.cache_dir / f"sppnet-features-{id(self):x}-work-{os.getpid()}"  # see R-CNN
        svms, svm_info = train_svm_head(features_of, self.fc_dim, data, regions, cfg, work, timer)
        self.svms = svms.to(self.device)
        return {
            **info,
            "finetune_final_loss": float(np.mean(losses[-50:])),
            "conv_maps_bytes": sum(f.numel() * f.element_size() for f, _ in maps),
            **svm_info,
        }

    def _pretrain(self, data: TrainData, rois: list[Tensor], matches: list[Matches]) -> float:
        """The stand-in for the ImageNet pre-training the original's conv layers had: ``pretrain_iters``
        iterations of the fine-tuning loss with the trunk among the parameters, its maps computed
        afresh each time. Returns the mean loss of the last 50 iterations."""
        cfg = self.cfg

        def live(i: int) -> tuple[Tensor, float]:
            image = torch.from_numpy(data.images[i]).to(self.device)
            x, s = prepare_image(image, cfg.scale, cfg.max_size)
            return self.trunk(x[None]), s

        self.trunk.train().requires_grad_(True)
        solver = replace(cfg.solver, iters=cfg.pretrain_iters)
        params = param_groups([(self.trunk, 1.0), (self.head, 1.0), (self.cls, 1.0)], solver)
        losses = self._softmax_sgd(live, rois, matches, params, solver, "sppnet conv pre-training")
        self.trunk.eval().requires_grad_(False)
        return float(np.mean(losses[-50:]))

    def _softmax_sgd(
        self,
        map_of: Callable[[int], tuple[Tensor, float]],
        rois: list[Tensor],
        matches: list[Matches],
        params: list[dict],
        solver: SolverConfig,
        desc: str,
    ) -> list[float]:
        """K+1-way softmax training of ``params`` on the pyramids of RoIs sampled as Fast R-CNN's
        mini-batches; ``map_of(i)`` gives image i's conv map (1, C, h, w) and its resize factor;
        ``params``: groups from pipelines.training.param_groups (biases at the solver's multiplier)."""
        cfg = self.cfg
        usable = images_in_band(matches, cfg.fg_iou, cfg.bg_iou, self.name)
        gen = torch.Generator().manual_seed(solver.seed + self.train_seed)
        order: list[int] = []
        mine = distributed.share(cfg.images_per_batch)  # as Fast R-CNN's

        def loss_fn(_: int) -> Tensor:
            pyramids, labels, count = [], [], 0
            for n in range(cfg.images_per_batch):
                i = draw_image(order, usable, gen)
                m = matches[i]
                fg, bg = sample_fg_bg(
                    m.iou, cfg.rois_per_image, cfg.fg_fraction, cfg.fg_iou, cfg.bg_iou, gen
                )
                keep = torch.cat((fg, bg))
                count += len(keep)
                if n in mine:
                    features, s = map_of(i)
                    pyramids.append(self._pyramid(features, rois[i][keep].to(self.device) * s))
                    labels.append(m.labels[keep])  # 0 below fg_iou: the background
            logits = self.cls(self.head(torch.cat(pyramids)))
            target = torch.cat(labels).to(self.device)
            return F.cross_entropy(logits, target, reduction="sum") / count

        self.head.train()
        losses = run_sgd(params, solver, loss_fn, desc)
        self.head.eval()
        return losses

    def paper_schedule(self, stages_s: dict[str, float]) -> dict:
        # The paper's hours leave out ImageNet pre-training: so do these ("pretrain").
        other = sum(v for k, v in stages_s.items() if k not in ("finetune", "pretrain"))
        return self.cfg.solver.paper_schedule(stages_s["finetune"], other)

    def object_floor(self) -> ObjectFloor:
        return conv_cell_floor(self.name, self.stride, self.cfg.scale, self.cfg.max_size)

    # -- inference --------------------------------------------------------------------------------

    @torch.no_grad()
    def _detect(
        self, image: Tensor, proposals: Tensor, timer: StageTimer, variant: str | None
    ) -> Detections:
        cfg = self.cfg
        _, features, s = conv_map(self.trunk, image, cfg.scale, cfg.max_size, timer)
        with timer.stage("spp"):
            pyramid = self._pyramid(features, proposals * s)
        with timer.stage("fc"):
            fc7 = self.head(pyramid)
        size = (image.shape[0], image.shape[1])
        regress = variant != "no_bbox_reg"
        return svm_detections(fc7, pyramid, proposals, self.svms, cfg, size, timer, regress)
