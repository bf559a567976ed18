"""R-CNN (Girshick et al., 2014): warped regions, a fine-tuned CNN, per-class SVMs, box regressors.

Shapes: R regions of one image, S input side, C trunk channels, P pool5 side, D fc7 width, K classes.
    warp:       (3, H, W) image, (R, 4) boxes -> (R, 3, S, S)
    conv:       (R, 3, S, S) -> trunk (R, C, S/16, S/16) -> max pool -> pool5 (R, C, P, P)
    fc:         pool5 -> fc7 (R, D)
    classifier: fc7 * scale -> SVM scores (R, K)
    bbox_reg:   pool5 * scale of the kept boxes -> moved boxes

Training stages: fine-tuning on warped regions (K+1-way softmax, 128-region batches of 32 foreground
and 96 background), fc7/pool5 feature extraction into an on-disk cache, SVMs with hard-negative mining,
ridge box regressors.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.backbones import Backbone
from pipelines.bbox_regression import BoxRegressors, fit_box_regressors, regression_examples
from pipelines.detector import Detections, Detector, TrainData, candidates, normalize_image, select
from pipelines.progress import progress
from pipelines.registry import BuildContext, PaperFigures, register
from pipelines.sampling import Matches, match, sample_fg_bg, with_ground_truth
from pipelines.svm import SVMConfig, negative_mask, train_svms
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig, run_sgd
from pipelines.warp import warp_regions

__all__ = ["RCNN", "FeatureCache", "RCNNConfig"]


@dataclass(frozen=True)
class RCNNConfig:
    """R-CNN's settings; defaults are the paper's."""

    context_pad: int = 16  # context around each warped box, in warped pixels
    solver: SolverConfig = field(default_factory=lambda: SolverConfig(paper_iters=100000))
    batch_size: int = 128  # regions per fine-tuning batch
    fg_fraction: float = 0.25  # 32 of 128
    fg_iou: float = 0.5  # fine-tuning foreground threshold
    feature_norm: float = 20.0  # features are scaled so their mean L2 norm is this
    svm: SVMConfig = field(default_factory=SVMConfig)
    svm_neg_iou: float = 0.3  # SVM negatives overlap every box of the class less than this
    bbox_lambda: float = 1000.0  # ridge penalty
    bbox_min_iou: float = 0.6  # box-regression examples overlap a ground-truth box more than this
    score_thresh: float = -1.1  # SVM score a (region, class) pair needs to be kept at test time
    nms_iou: float = 0.3
    max_per_class: int = 100
    region_batch: int = 256  # warped regions per forward pass
    keep_feature_cache: bool = False  # keep the on-disk fc7/pool5 cache after training


@dataclass
class FeatureCache:
    """R-CNN's training-set features on disk, and what the SVMs and box regressors need of each region.

    Attributes:
        folder: where the files are.
        offsets: int64 (N + 1,): image i's regions are rows offsets[i]:offsets[i + 1] of ``fc7``.
        fc7: float16 (sum R, D), memory-mapped: every training region's fc7.
        neg_masks: per image, bool (R, K): which regions are SVM negatives of which class.
        pos_rows: int64 (P,): the rows of the ground-truth regions (the SVM positives).
        pos_labels: int64 (P,): their classes 1..K.
        pool5: float16 (M, C*P*P), memory-mapped: pool5 of the box-regression examples.
        reg_boxes, reg_gt, reg_labels, reg_iou: the examples' regions (M, 4), best ground-truth boxes
            (M, 4), classes (M,) and overlaps (M,).
        fc7_scale, pool5_scale: the factors that bring the mean L2 norm of each to ``feature_norm``.
    """

    folder: Path
    offsets: np.ndarray
    fc7: np.ndarray
    neg_masks: list[np.ndarray]
    pos_rows: np.ndarray
    pos_labels: np.ndarray
    pool5: np.ndarray
    reg_boxes: np.ndarray
    reg_gt: np.ndarray
    reg_labels: np.ndarray
    reg_iou: np.ndarray
    fc7_scale: float
    pool5_scale: float

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image i's scaled fc7 (R, D) float32 and negative mask (R, K): what SVM mining visits."""
        rows = slice(self.offsets[i], self.offsets[i + 1])
        return np.asarray(self.fc7[rows], np.float32) * self.fc7_scale, self.neg_masks[i]


@register
class RCNN(Detector):
    """R-CNN behind the Detector interface: fine-tunes a copy of the shared backbone, caches its
    training-set features in ``context.cache_dir`` while the SVMs and box regressors train."""

    name = "rcnn"
    label = "R-CNN"
    config_class = RCNNConfig
    variants = ("no_bbox_reg",)
    train_stages = ("finetune", "features", "svm", "bbox_reg")
    stage_groups: ClassVar[dict[str, str]] = {
        "preprocess": "other",
        "warp": "per_region",
        "conv": "per_region",  # the trunk runs once per warped region: per-region work here
        "fc": "per_region",
        "classifier": "classifier",
        "bbox_reg": "classifier",
        "nms": "classifier",
    }
    paper: ClassVar[PaperFigures] = PaperFigures(
        "Fast R-CNN paper, Table 4 (VGG16, K40 GPU, VOC07 test)",
        train_hours=84.0,
        test_seconds=47.0,
        voc07_map=66.0,
    )

    def __init__(self, cfg: RCNNConfig, context: BuildContext):
        super().__init__(cfg, context)
        backbone = context.backbone()
        self.net = backbone.to(self.device)
        self.cls = nn.Linear(backbone.fc_dim, self.num_classes + 1).to(self.device)  # fine-tuning
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)
        self.cache_dir = Path(context.cache_dir)
        self.svm_w: Tensor | None = None  # (D, K)
        self.svm_b: Tensor | None = None  # (K,)
        self.fc7_scale = 1.0
        self.pool5_scale = 1.0
        self.regressors: BoxRegressors | None = None

    # Box-regression examples (IoU > 0.6 with a ground-truth box) are a small share of the regions:
    # the disk estimate allows this much of them.
    REGRESSION_SHARE = 0.1

    @classmethod
    def cache_bytes(
        cls, cfg: RCNNConfig, train_images: int, regions_per_image: int, backbone: Backbone
    ) -> int:
        """fc7 of every training region and pool5 of the box-regression examples, in float16."""
        regions = train_images * regions_per_image
        pool5 = backbone.channels * backbone.pool_size**2
        return int(2 * regions * (backbone.fc_dim + cls.REGRESSION_SHARE * pool5))

    # -- the network on warped regions -----------------------------------------------------------

    def _pool5(self, regions: Tensor) -> Tensor:
        """(R, 3, S, S) -> (R, C, P, P): the trunk, then the last max pool."""
        return F.adaptive_max_pool2d(self.net.trunk(regions), self.net.pool_size)

    def _warp(self, image: Tensor, boxes: Tensor) -> Tensor:
        return warp_regions(image, boxes, self.net.input_size, self.cfg.context_pad)

    @torch.no_grad()
    def _features(self, image: Tensor, boxes: Tensor, timer: StageTimer) -> tuple[Tensor, Tensor]:
        """fc7 (R, D) and flattened pool5 (R, C*P*P) of every box of one normalized image, in chunks
        of ``region_batch`` regions; ``timer`` gets the warp, conv and fc stages."""
        fc7, pool5 = [], []
        for chunk in boxes.split(self.cfg.region_batch):
            with timer.stage("warp"):
                regions = self._warp(image, chunk)
            with timer.stage("conv"):
                p5 = self._pool5(regions)
            with timer.stage("fc"):
                fc7.append(self.net(p5))
            pool5.append(p5.flatten(1))
        if not fc7:
            d5 = self.net.channels * self.net.pool_size**2
            return image.new_zeros((0, self.net.fc_dim)), image.new_zeros((0, d5))
        return torch.cat(fc7), torch.cat(pool5)

    # -- training ---------------------------------------------------------------------------------

    def fit(self, data: TrainData, timer: StageTimer) -> dict:
        rois, gts, matches = [], [], []
        for i, props in enumerate(data.proposals):
            gt_boxes, gt_labels = data.ground_truth(i)
            rois.append(with_ground_truth(torch.from_numpy(props), gt_boxes))
            gts.append((gt_boxes, gt_labels))
            matches.append(match(rois[i], gt_boxes, gt_labels, self.cfg.fg_iou))
        with timer.stage("finetune"):
            losses = self._finetune(data, rois, matches)
        # The process id ends the name: a later run removes the folder if this process was killed.
        work = self.cache_dir / f"rcnn-features-{id(self):x}-work-{os.getpid()}"
        try:
            with timer.stage("features"):
                cache = self._cache_features(data, rois, gts, matches, work)
            self.fc7_scale, self.pool5_scale = cache.fc7_scale, cache.pool5_scale
            with timer.stage("svm"):
                records = self._train_svms(cache)
            with timer.stage("bbox_reg"):
                self._train_regressors(cache)
            cache_bytes = cache.bytes
        finally:
            if not self.cfg.keep_feature_cache:
                shutil.rmtree(work, ignore_errors=True)
        return {
            "finetune_final_loss": float(np.mean(losses[-50:])),
            "feature_cache_bytes": cache_bytes,
            "feature_cache_regions": int(cache.offsets[-1]),
            "feature_norm_scale": {"fc7": self.fc7_scale, "pool5": self.pool5_scale},
            "svm": [{"class": j + 1, **asdict(r)} for j, r in enumerate(records)],
            "bbox_examples": self.regressors.examples,
        }

    def _finetune(self, data: TrainData, rois: list[Tensor], matches: list[Matches]):
        """K+1-way softmax fine-tuning on warped regions drawn across the whole training set."""
        cfg = self.cfg
        image_of = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rois)])
        boxes = torch.cat(rois)
        iou = torch.cat([m.iou for m in matches])
        labels = torch.cat([m.labels for m in matches])
        gen = torch.Generator().manual_seed(cfg.solver.seed)
        self.net.train()

        def loss_fn(_: int) -> Tensor:
            fg, bg = sample_fg_bg(
                iou, cfg.batch_size, cfg.fg_fraction, cfg.fg_iou, (0.0, cfg.fg_iou), gen
            )
            picked = torch.cat((fg, bg))
            regions = torch.empty(
                (len(picked), 3, self.net.input_size, self.net.input_size), device=self.device
            )
            for i in torch.unique(image_of[picked]).tolist():  # one batched warp per image
                rows = torch.nonzero(image_of[picked] == i).flatten()
                image = normalize_image(torch.from_numpy(data.images[i]).to(self.device))
                regions[rows.to(self.device)] = self._warp(
                    image, boxes[picked[rows]].to(self.device)
                )
            logits = self.cls(self.net(self._pool5(regions)))
            return F.cross_entropy(logits, labels[picked].to(self.device))

        params = list(self.net.parameters()) + list(self.cls.parameters())
        losses = run_sgd(params, cfg.solver, loss_fn, "rcnn fine-tune")
        self.net.eval()
        return losses

    def _cache_features(
        self,
        data: TrainData,
        rois: list[Tensor],
        gts: list[tuple[Tensor, Tensor]],
        matches: list[Matches],
        work: Path,
    ) -> FeatureCache:
        """Write fc7 of every training region and pool5 of the box-regression examples to disk
        (float16). Which regions are SVM negatives (pipelines.svm.negative_mask) and which are
        box-regression examples (pipelines.bbox_regression.regression_examples) is decided by those
        modules; this only extracts and stores."""
        cfg = self.cfg
        work.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [len(r) for r in rois])
        fc7_file = np.lib.format.open_memmap(
            work / "fc7.npy", "w+", np.float16, (int(offsets[-1]), self.net.fc_dim)
        )
        examples, reg_feats, neg_masks = [], [], []
        norm7 = norm5 = 0.0
        for i in progress(range(len(rois)), "rcnn features", "img"):
            image = normalize_image(torch.from_numpy(data.images[i]).to(self.device))
            fc7, pool5 = self._features(image, rois[i].to(self.device), StageTimer(self.device))
            fc7, pool5 = fc7.cpu(), pool5.cpu()
            fc7_file[offsets[i] : offsets[i + 1]] = fc7.numpy().astype(np.float16)
            norm7 += float(fc7.norm(dim=1).sum())
            norm5 += float(pool5.norm(dim=1).sum())
            ann = data.annotations[i]
            neg_masks.append(
                negative_mask(rois[i], ann.boxes, ann.labels, self.num_classes, cfg.svm_neg_iou)
            )
            ex = regression_examples(matches[i], *gts[i], cfg.bbox_min_iou)
            examples.append(ex)
            reg_feats.append(pool5[torch.from_numpy(ex.rows)].numpy().astype(np.float16))
        fc7_file.flush()
        np.save(work / "pool5.npy", np.concatenate(reg_feats))
        n = max(int(offsets[-1]), 1)
        all_rois = torch.cat(rois).numpy()
        pos = [offsets[i] + np.arange(len(gt)) for i, (gt, _) in enumerate(gts)]  # gt rows first
        return FeatureCache(
            folder=work,
            offsets=offsets,
            fc7=np.load(work / "fc7.npy", mmap_mode="r"),
            neg_masks=neg_masks,
            pos_rows=np.concatenate(pos).astype(np.int64),
            pos_labels=np.concatenate([lab.numpy() for _, lab in gts]).astype(np.int64),
            pool5=np.load(work / "pool5.npy", mmap_mode="r"),
            reg_boxes=all_rois[
                np.concatenate([ex.rows + offsets[i] for i, ex in enumerate(examples)])
            ],
            reg_gt=np.concatenate([ex.gt_boxes for ex in examples]),
            reg_labels=np.concatenate([ex.labels for ex in examples]),
            reg_iou=np.concatenate([ex.iou for ex in examples]),
            fc7_scale=cfg.feature_norm / max(norm7 / n, 1e-12),
            pool5_scale=cfg.feature_norm / max(norm5 / n, 1e-12),
        )

    def _train_svms(self, cache: FeatureCache):
        pos_all = np.asarray(cache.fc7[cache.pos_rows], np.float32) * cache.fc7_scale
        positives = [pos_all[cache.pos_labels == j + 1] for j in range(self.num_classes)]
        w, b, records = train_svms(positives, cache, self.cfg.svm)
        self.svm_w = torch.from_numpy(w).to(self.device)
        self.svm_b = torch.from_numpy(b).to(self.device)
        return records

    def _train_regressors(self, cache: FeatureCache) -> None:
        feats = np.asarray(cache.pool5, np.float32) * cache.pool5_scale
        self.regressors = fit_box_regressors(
            feats,
            cache.reg_boxes,
            cache.reg_gt,
            cache.reg_labels,
            cache.reg_iou,
            self.num_classes,
            lam=self.cfg.bbox_lambda,
            min_iou=self.cfg.bbox_min_iou,
        ).to(self.device)

    def paper_schedule(self, stages_s: dict[str, float]) -> dict:
        other = sum(v for name, v in stages_s.items() if name != "finetune")
        return self.cfg.solver.paper_schedule(stages_s["finetune"], other)

    # -- inference --------------------------------------------------------------------------------

    @torch.no_grad()
    def _detect(
        self, image: Tensor, proposals: Tensor, timer: StageTimer, variant: str | None
    ) -> Detections:
        with timer.stage("preprocess"):
            x = normalize_image(image)
        fc7, pool5 = self._features(x, proposals, timer)
        with timer.stage("classifier"):
            scores = (fc7 * self.fc7_scale) @ self.svm_w + self.svm_b  # (R, K)
            rows, cls = candidates(scores, self.cfg.score_thresh)
        with timer.stage("bbox_reg"):
            boxes = proposals[rows]
            if variant != "no_bbox_reg":
                feats = pool5[rows] * self.pool5_scale
                boxes = self.regressors.predict(feats, boxes, cls)
        with timer.stage("nms"):
            size = (image.shape[0], image.shape[1])
            return select(
                boxes, scores[rows, cls], cls + 1, size, self.cfg.nms_iou, self.cfg.max_per_class
            )
