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
(pipelines.rcnn.train_svm_head): SVMs on fc7, box regressors on the pyramid (as R-CNN uses pool5).
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
from torch import Tensor, nn

from pipelines import distributed
from pipelines.backbones import Backbone
from pipelines.boxes import boxes_to_rois
from pipelines.detector import Detections, Detector, TrainData
from pipelines.fast_rcnn import (
    conv_map,
    draw_image,
    images_in_band,
    prepare_image,
    roi_max_pool,
)
from pipelines.fidelity import SPP_NET_REPO, Setting, setting
from pipelines.rcnn import (
    REGION_BYTES,
    SVMHead,
    check_features,
    svm_cache_bytes,
    svm_detections,
    train_svm_head,
    training_regions,
)
from pipelines.registry import BuildContext, PaperFigures, register
from pipelines.sampling import Matches, sample_fg_bg
from pipelines.svm import SVMConfig
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig, param_groups, run_sgd, solver_rows

__all__ = ["SPPnet", "SPPnetConfig", "spatial_pyramid_pool", "spp_head"]


@dataclass(frozen=True)
class SPPnetConfig:
    """SPPnet's settings; defaults are the paper's where it gives them, Fast R-CNN's scale otherwise."""

    scale: int = 600  # shorter image side after resizing
    max_size: int = 1000  # longer side at most this
    levels: tuple[int, ...] = (1, 2, 3, 6)  # pyramid levels: l x l bins each
    fc6_seed: int = 0  # seeds the new fc6's initial weights
    # Iterations of conv pre-training on the training split before the trunk is frozen, for a shared
    # backbone that starts from random weights (0: none; backbone.pretrain is the shared stand-in).
    pretrain_iters: int = 0
    # He et al. fine-tune 250k mini-batches at lr 1e-4, then 50k at 1e-5.
    solver: SolverConfig = field(
        default_factory=lambda: SolverConfig(paper_iters=300000, lr=1e-4, lr_step=250000)
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
        self.head = spp_head(backbone.head, width, cfg.fc6_seed).to(self.device)
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
        box-regression examples, in float16 (pipelines.rcnn.svm_cache_bytes)."""
        pyramid = backbone.channels * sum(lv * lv for lv in cfg.levels)
        regions = train_images * regions_per_image
        return svm_cache_bytes(cfg.features, regions, backbone.fc_dim, pyramid, free_bytes)

    @classmethod
    def train_ram_bytes(
        cls, cfg: SPPnetConfig, train_images: int, regions_per_image: int, backbone: Backbone
    ) -> int:
        """The float16 conv maps of the training images (at most C x scale/16 x max_size/16 each) and
        the training regions (pipelines.rcnn.REGION_BYTES each)."""
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
        gen = torch.Generator().manual_seed(solver.seed)
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

    @classmethod
    def fidelity(cls, cfg: SPPnetConfig) -> list[Setting]:
        """SPPnet's settings beside ShaoqingRen/SPP_net's VOC07 recipe (its released code is for the
        ZF-5 network; the paper's VGG16 settings that differ are named in the sources)."""
        repo = SPP_NET_REPO
        defs = "model-defs"
        solver, net = (
            f"{defs}/pascal_finetune_fc_spm_solver.prototxt",
            f"{defs}/pascal_finetune_fc_spm_train.prototxt",
        )
        script, finetune = "experiments/Script_spp_voc.m", "finetuning/spp_finetune_voc.m"
        train, test = "spp_train.m", "spp_test.m"
        bbox = "experiments/spp_exp_bbox_reg_train_and_test_voc.m"
        max_iter = (
            f"{solver}:25 (the snapshot kept is the one of lowest validation loss, "
            f"finetuning/spp_finetune_voc.m:152-164; SPPnetConfig records the paper's 250k + 50k)"
        )
        originals = {
            "lr": (0.001, f"{solver}:15-16 (SPPnetConfig records the paper's 1e-4)"),
            "lr_step": (30000, f"{solver}:15-21 (three 30k steps, then 1e-5 held)"),
            "momentum": (0.9, f"{solver}:12"),
            "weight_decay": (0.0005, f"{solver}:13"),
            "iters": (200000, max_iter),
            "paper_iters": (200000, max_iter),
            "bias_lr_mult": (2.0, f"{net}:28-29,69-70,111-112"),
        }
        svm = cfg.svm
        bias_decay = "fc6, fc7: yes; fc8: no"
        rows = [
            setting("sppnet", name, original, f"{repo} {source}", value)
            for name, original, source, value in (
                (
                    "weight decay on biases",
                    bias_decay,
                    f"{net}:113-114 (fc8 only; Caffe's default 1 elsewhere)",
                    "everywhere" if cfg.solver.bias_decay else "nowhere",
                ),
                (
                    "pyramid levels (l x l bins)",
                    (1, 2, 3, 6),
                    f"{defs}/Zeiler_conv5.prototxt:248-342, {net}:3 (12800 = 256 x 50 inputs)",
                    cfg.levels,
                ),
                (
                    "conv layers trained in fine-tuning",
                    "none",
                    f"{script}:62-70 (conv5 cached once), {net}:1-10 (fc layers only)",
                    "none",
                ),
                (
                    "image scales (shorter side, px)",
                    (480, 576, 688, 874, 1200),
                    f"{script}:24; per region a random one in fine-tuning ({finetune}:46), the one "
                    f"nearest 224 x 224 at test (spp_features_convX_to_poolX.m:36-42)",
                    f"{cfg.scale} (longer at most {cfg.max_size})",
                ),
                (
                    "regions per fine-tuning batch",
                    128,
                    f"{finetune}:48",
                    cfg.images_per_batch * cfg.rois_per_image,
                ),
                (
                    "images a fine-tuning batch's regions come from",
                    "any (regions pooled over a shuffled run of images)",
                    f"{finetune}:183-212",
                    cfg.images_per_batch,
                ),
                ("foreground fraction", 0.25, f"{finetune}:51", cfg.fg_fraction),
                ("foreground IoU", 0.5, f"{finetune}:52", cfg.fg_iou),
                ("background IoU band", (0.1, 0.5), f"{finetune}:53", cfg.bg_iou),
                ("fine-tuning flips", "append", f"{script}:27,68,89", "none"),
                ("SVM features", "fc7", f"{script}:33", "fc7"),
                ("SVM training flips", "none", f"{script}:34,77", "none"),
                ("SVM C", 0.001, f"{train}:43", svm.c),
                ("SVM bias multiplier", 10.0, f"{train}:44", svm.bias_scale),
                ("SVM positive weight", 2.0, f"{train}:45", svm.pos_weight),
                (
                    "features scaled to mean norm",
                    20.0,
                    "spp_scale_features.m:11",
                    cfg.feature_norm,
                ),
                ("SVM negatives' IoU, below", 0.3, f"{script}:49", cfg.svm_neg_iou),
                ("hard negatives join above", -1.0001, f"{train}:450", svm.hard_thresh),
                ("cached negatives leave below", -1.2, f"{train}:449", svm.evict_thresh),
                ("SVM retrains after new negatives", 2000, f"{train}:448", svm.retrain_limit),
                ("box-regression features", "pyramid (conv5)", f"{bbox}:39", "pyramid (conv5)"),
                ("box-regression ridge lambda", 4000.0, f"{bbox}:40", cfg.bbox_lambda),
                (
                    "box-regression examples' IoU, above",
                    0.5,
                    f"{bbox}:38, bbox_regression/spp_train_bbox_regressor.m:90",
                    cfg.bbox_min_iou,
                ),
                (
                    "test score threshold (the original's starting one)",
                    -1.5,
                    f"{test}:75",
                    cfg.score_thresh,
                ),
                (
                    "candidates per class over the test set",
                    "5 x images (the threshold rises to keep them)",
                    f"{test}:72,119-141",
                    "none",
                ),
                ("NMS IoU", 0.3, f"{test}:103", cfg.nms_iou),
                (
                    "detections per class and image, after NMS",
                    100,
                    f"{test}:73,106-107",
                    cfg.max_per_class,
                ),
            )
        ]
        sources = {key: (value, f"{repo} {source}") for key, (value, source) in originals.items()}
        return [*solver_rows("sppnet", cfg.solver, sources), *rows]
