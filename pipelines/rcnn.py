"""R-CNN (Girshick et al., 2014): warped regions, a fine-tuned CNN, per-class SVMs, box regressors.

Shapes: R regions of one image, S input side, C trunk channels, P pool5 side, D fc7 width, K classes.
    warp:       (3, H, W) image, (R, 4) boxes -> (R, 3, S, S)
    conv:       (R, 3, S, S) -> trunk (R, C, S/16, S/16) -> max pool -> pool5 (R, C, P, P)
    fc:         pool5 -> fc7 (R, D)
    classifier: fc7 * scale -> SVM scores (R, K)
    bbox_reg:   pool5 * scale of the kept boxes -> moved boxes

Training stages: fine-tuning on warped regions (K+1-way softmax, 128-region batches of 32 foreground
and 96 background, each region mirrored with probability 1/2; every layer trains, biases at twice the
rate without weight decay, the new classifier at 10x), fc7/pool5 feature extraction into an on-disk
cache, SVMs with hard-negative mining, ridge box regressors. Test: SVM scores, the originals' adaptive
per-class candidate budget (or a fixed threshold), box regression, NMS 0.3.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines import distributed
from pipelines.backbones import Backbone
from pipelines.bbox_regression import BoxRegressors, fit_box_regressors, regression_examples
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
from pipelines.fidelity import RCNN_REPO, Setting, setting
from pipelines.progress import progress
from pipelines.registry import BuildContext, PaperFigures, register
from pipelines.sampling import Matches, match, sample_fg_bg, with_ground_truth
from pipelines.svm import SVMConfig, negative_mask, train_svms
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig, param_groups, run_sgd, solver_rows
from pipelines.warp import warp_regions

__all__ = [
    "RCNN",
    "FeatureCache",
    "RCNNConfig",
    "SVMHead",
    "SVMSettings",
    "cache_features",
    "mirror_regions",
    "svm_detections",
    "train_svm_head",
    "training_regions",
]


# The paper's fine-tuning solver: lr 0.001 divided by 10 every 20k iterations
# (pascal_finetune_solver.prototxt:5-12), biases at 2x without weight decay
# (pascal_finetune_train.prototxt:25-28); the released VOC07 model is the 70k-iteration snapshot
# (README.md:203), so the hours extrapolate to 70k.
PAPER_SOLVER = SolverConfig(
    paper_iters=70000, lr=1e-3, lr_step=20000, bias_lr_mult=2.0, bias_decay=False
)


@dataclass(frozen=True)
class RCNNConfig:
    """R-CNN's settings; defaults are the paper's."""

    context_pad: int = 16  # context around each warped box, in warped pixels
    solver: SolverConfig = field(default_factory=lambda: PAPER_SOLVER)
    cls_lr_mult: float = 10.0  # the new classifier's lr multiplier (its bias: times bias_lr_mult)
    mirror: bool = True  # mirror each fine-tuning region horizontally with probability 1/2
    batch_size: int = 128  # regions per fine-tuning batch
    fg_fraction: float = 0.25  # 32 of 128
    fg_iou: float = 0.5  # fine-tuning foreground threshold
    feature_norm: float = 20.0  # features are scaled so their mean L2 norm is this
    svm: SVMConfig = field(default_factory=SVMConfig)
    svm_neg_iou: float = 0.3  # SVM negatives overlap every box of the class less than this
    bbox_lambda: float = 1000.0  # ridge penalty
    bbox_min_iou: float = 0.6  # box-regression examples overlap a ground-truth box more than this
    test_topk: str = "adaptive"  # test-time candidates: "adaptive" budget or "fixed" threshold
    max_per_image: int = 100  # "adaptive": candidates per class and image, before NMS
    max_per_set_factor: int = 40  # "adaptive": candidates per class over a pass, per image
    score_thresh: float = -1.1  # "fixed": SVM score a (region, class) pair needs
    max_per_class: int = 100  # "fixed": detections kept per class and image, after NMS
    nms_iou: float = 0.3
    region_batch: int = 256  # warped regions per forward pass
    keep_feature_cache: bool = False  # keep the on-disk fc7/pool5 cache after training

    def __post_init__(self):
        if self.test_topk not in TEST_TOPK:
            raise ValueError(f"test_topk must be one of {TEST_TOPK}, got {self.test_topk!r}")
        if self.cls_lr_mult < 0:
            raise ValueError(f"cls_lr_mult must be >= 0, got {self.cls_lr_mult}")


@dataclass
class FeatureCache:
    """Training-set features on disk, and what the SVMs and box regressors need of each region (R-CNN's,
    and SPPnet's, which trains the same SVMs and regressors on its own features).

    Attributes:
        folder: where the files are.
        offsets: int64 (N + 1,): image i's regions are rows offsets[i]:offsets[i + 1] of ``fc7``.
        fc7: float16 (sum R, D), memory-mapped: every training region's fc7.
        neg_masks: per image, bool (R, K): which regions are SVM negatives of which class.
        pos_rows: int64 (P,): the rows of the ground-truth regions (the SVM positives).
        pos_labels: int64 (P,): their classes 1..K.
        pool5: float16 (M, F), memory-mapped: the box-regression features of the examples (R-CNN's
            pool5, F = C*P*P; SPPnet's pooled pyramid).
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


class SVMSettings(Protocol):
    """The settings the SVM stage reads from a pipeline's config (RCNNConfig, SPPnetConfig)."""

    feature_norm: float
    svm: SVMConfig
    svm_neg_iou: float
    bbox_lambda: float
    bbox_min_iou: float
    keep_feature_cache: bool
    score_thresh: float
    nms_iou: float
    max_per_class: int


@dataclass
class SVMHead:
    """What the SVM stage trains: per-class SVMs on scaled fc7 and box regressors on scaled features.

    Attributes:
        weight: Tensor[D, K]; bias: Tensor[K]: the SVMs.
        fc7_scale: the factor that brings fc7's mean L2 norm to ``feature_norm``.
        reg_scale: the same factor for the box-regression features (R-CNN's pool5).
        regressors: the class-specific box regressors.
    """

    weight: Tensor
    bias: Tensor
    fc7_scale: float
    reg_scale: float
    regressors: BoxRegressors

    def tensors(self, with_regressors: bool = True) -> list[Tensor]:
        """What runs at test time: the SVMs, and (unless left out) the box regressors."""
        reg = self.regressors
        return [self.weight, self.bias] + (
            [reg.weight, reg.bias, reg.t_inv, reg.mu] if with_regressors else []
        )

    def to(self, device: torch.device) -> SVMHead:
        return SVMHead(
            self.weight.to(device),
            self.bias.to(device),
            self.fc7_scale,
            self.reg_scale,
            self.regressors.to(device),
        )


# Returns fc7 (R, D) and the box-regression features (R, F) of image i's boxes (R, 4).
FeatureFn = Callable[[int, Tensor], tuple[Tensor, Tensor]]


def train_svm_head(
    features_of: FeatureFn,
    fc_dim: int,
    data: TrainData,
    regions: tuple[list[Tensor], list[tuple[Tensor, Tensor]], list[Matches]],
    cfg: SVMSettings,
    work: Path,
    timer: StageTimer,
) -> tuple[SVMHead, dict]:
    """R-CNN's steps after fine-tuning, which SPPnet repeats on its own features: extract every training
    region's features into an on-disk cache ("features"), mine hard negatives for the SVMs ("svm"), fit
    the box regressors ("bbox_reg"); the cache is removed afterwards unless ``keep_feature_cache``.

    Args:
        features_of: the features of image i's boxes.
        fc_dim: D, the width of the fc7 it returns.
        data: the training split.
        regions: per image, its training regions (Tensor[R, 4], ground truth first), ground-truth boxes
            and labels, and the regions' matches to them.
        cfg: the pipeline's settings.
        work: the cache folder to create.
        timer: receives the three stages.

    Returns:
        (the trained head, facts to record: cache size, feature scales, mining records, examples).
    """
    try:
        with timer.stage("features"):
            cache = cache_features(features_of, fc_dim, data, *regions, cfg, work)
        with timer.stage("svm"):
            pos_all = np.asarray(cache.fc7[cache.pos_rows], np.float32) * cache.fc7_scale
            positives = [pos_all[cache.pos_labels == j + 1] for j in range(data.num_classes)]
            w, b, records = train_svms(positives, cache, cfg.svm)
        with timer.stage("bbox_reg"):
            regressors = fit_box_regressors(
                np.asarray(cache.pool5, np.float32) * cache.pool5_scale,
                cache.reg_boxes,
                cache.reg_gt,
                cache.reg_labels,
                cache.reg_iou,
                data.num_classes,
                lam=cfg.bbox_lambda,
                min_iou=cfg.bbox_min_iou,
            )
        cache_bytes = cache.bytes
    finally:
        if not cfg.keep_feature_cache:
            shutil.rmtree(work, ignore_errors=True)
    head = SVMHead(
        torch.from_numpy(w), torch.from_numpy(b), cache.fc7_scale, cache.pool5_scale, regressors
    )
    info = {
        "feature_cache_bytes": cache_bytes,
        "feature_cache_regions": int(cache.offsets[-1]),
        "feature_norm_scale": {"fc7": cache.fc7_scale, "pool5": cache.pool5_scale},
        "svm": [{"class": j + 1, **asdict(r)} for j, r in enumerate(records)],
        "bbox_examples": regressors.examples,
    }
    return head, info


def cache_features(
    features_of: FeatureFn,
    fc_dim: int,
    data: TrainData,
    rois: list[Tensor],
    gts: list[tuple[Tensor, Tensor]],
    matches: list[Matches],
    cfg: SVMSettings,
    work: Path,
) -> FeatureCache:
    """Write fc7 of every training region and the regression features of the box-regression examples
    to disk (float16). Which regions are SVM negatives (pipelines.svm.negative_mask) and which are
    box-regression examples (pipelines.bbox_regression.regression_examples) is decided by those
    modules; this only extracts and stores."""
    work.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(r) for r in rois])
    fc7_file = np.lib.format.open_memmap(
        work / "fc7.npy", "w+", np.float16, (int(offsets[-1]), fc_dim)
    )
    examples, reg_feats, neg_masks = [], [], []
    norm7 = norm5 = 0.0
    for i in progress(range(len(rois)), f"{work.name.split('-')[0]} features", "img"):
        fc7, pool5 = (f.cpu() for f in features_of(i, rois[i]))
        fc7_file[offsets[i] : offsets[i + 1]] = fc7.numpy().astype(np.float16)
        norm7 += float(fc7.norm(dim=1).sum())
        norm5 += float(pool5.norm(dim=1).sum())
        ann = data.annotations[i]
        neg_masks.append(
            negative_mask(rois[i], ann.boxes, ann.labels, data.num_classes, cfg.svm_neg_iou)
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
        reg_boxes=all_rois[np.concatenate([ex.rows + offsets[i] for i, ex in enumerate(examples)])],
        reg_gt=np.concatenate([ex.gt_boxes for ex in examples]),
        reg_labels=np.concatenate([ex.labels for ex in examples]),
        reg_iou=np.concatenate([ex.iou for ex in examples]),
        fc7_scale=cfg.feature_norm / max(norm7 / n, 1e-12),
        pool5_scale=cfg.feature_norm / max(norm5 / n, 1e-12),
    )


def svm_detections(
    fc7: Tensor,
    reg_features: Tensor,
    proposals: Tensor,
    head: SVMHead,
    cfg: SVMSettings,
    size: tuple[int, int],
    timer: StageTimer,
    regress: bool = True,
    budget: ScoreBudget | None = None,
) -> Detections:
    """The test-time steps after the features: SVM scores and the candidate (region, class) pairs
    ("classifier"), box regression of the candidates ("bbox_reg"), NMS ("nms").

    Args:
        fc7 (Tensor[R, D]), reg_features (Tensor[R, F]): the proposals' features, unscaled.
        proposals (Tensor[R, 4]): in image pixels.
        head: the trained SVMs and regressors, on the features' device.
        cfg: NMS overlap; without a budget, the score threshold and detections kept per class.
        size: the image's (H, W).
        timer: receives the three stages.
        regress: False leaves the boxes where the proposals are (the "no_bbox_reg" variant).
        budget: the originals' adaptive candidate budget (Detector.test_budget); None: the fixed
            ``score_thresh``, and at most ``max_per_class`` per class after NMS.
    """
    with timer.stage("classifier"):
        scores = (fc7 * head.fc7_scale) @ head.weight + head.bias  # (R, K)
        if budget is None:
            rows, cls = candidates(scores, cfg.score_thresh)
        else:
            rows, cls = budget.candidates(scores)
    with timer.stage("bbox_reg"):
        boxes = proposals[rows]
        if regress:
            boxes = head.regressors.predict(reg_features[rows] * head.reg_scale, boxes, cls)
    with timer.stage("nms"):
        cap = cfg.max_per_class if budget is None else budget.max_per_image
        return select(boxes, scores[rows, cls], cls + 1, size, cfg.nms_iou, cap)


def mirror_regions(regions: Tensor, flip: Tensor) -> Tensor:
    """Mirror warped regions horizontally, as Caffe's window data layer does for R-CNN's fine-tuning
    (``mirror: true``, each region with probability 1/2: the caller draws ``flip``).

    Args:
        regions (Tensor[B, 3, S, S]): warped regions.
        flip (Tensor[B] bool): which to mirror.

    Returns:
        Tensor[B, 3, S, S].
    """
    return torch.where(flip.to(regions.device)[:, None, None, None], regions.flip(3), regions)


def training_regions(
    data: TrainData, fg_iou: float
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]], list[Matches]]:
    """Per image: the training regions (ground truth first, then the shared proposals), the ground
    truth (boxes, labels), and each region's match at ``fg_iou``; matched once and shared between
    fine-tuning and the feature cache."""
    rois, gts, matches = [], [], []
    for i, props in enumerate(data.proposals):
        gt_boxes, gt_labels = data.ground_truth(i)
        rois.append(with_ground_truth(torch.from_numpy(props), gt_boxes))
        gts.append((gt_boxes, gt_labels))
        matches.append(match(rois[i], gt_boxes, gt_labels, fg_iou))
    return rois, gts, matches


@register
class RCNN(Detector):
    """R-CNN behind the Detector interface: fine-tunes a copy of the shared backbone, caches its
    training-set features in ``context.cache_dir`` while the SVMs and box regressors train."""

    name = "rcnn"
    label = "R-CNN"
    config_class = RCNNConfig
    keeps_threshold_ties = True  # rcnn_test.m:99 drops only the detections below the threshold
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
        self.svms: SVMHead | None = None
        distributed.check_split(cfg.batch_size, f"pipelines.{self.name}.batch_size")

    def test_modules(self, variant: str | None = None) -> list[nn.Module]:
        return [self.net]  # the fine-tuning classifier does not run at test time

    def test_tensors(self, variant: str | None = None) -> list[Tensor]:
        return self.svms.tensors(with_regressors=variant != "no_bbox_reg") if self.svms else []

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
        regions = training_regions(data, self.cfg.fg_iou)
        with timer.stage("finetune"):
            losses = self._finetune(data, regions[0], regions[2])

        def extract(i: int) -> tuple[Tensor, Tensor]:
            image = normalize_image(torch.from_numpy(data.images[i]).to(self.device))
            boxes = regions[0][i].to(self.device)
            return tuple(f.cpu() for f in self._features(image, boxes, StageTimer(self.device)))

        # Under torchrun the processes extract the images in turn and share the features.
        extracted = distributed.in_rounds(extract, len(data.images))

        def features_of(i: int, boxes: Tensor) -> tuple[Tensor, Tensor]:
            return extracted(i)

        # The process id ends the name: a later run removes the folder if this process was killed.
        work = self.cache_dir / f"rcnn-features-{id(self):x}-work-{os.getpid()}"
        svms, info = train_svm_head(
            features_of, self.net.fc_dim, data, regions, self.cfg, work, timer
        )
        self.svms = svms.to(self.device)
        return {"finetune_final_loss": float(np.mean(losses[-50:])), **info}

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
            batch = torch.cat((fg, bg))
            flips = torch.rand(len(batch), generator=gen) < 0.5  # drawn whether used or not
            mine = distributed.share(len(batch))  # every process draws the batch, runs its share
            picked = batch[mine]
            regions = torch.empty(
                (len(picked), 3, self.net.input_size, self.net.input_size), device=self.device
            )
            for i in torch.unique(image_of[picked]).tolist():  # one batched warp per image
                rows = torch.nonzero(image_of[picked] == i).flatten()
                image = normalize_image(torch.from_numpy(data.images[i]).to(self.device))
                regions[rows.to(self.device)] = self._warp(
                    image, boxes[picked[rows]].to(self.device)
                )
            if cfg.mirror:
                regions = mirror_regions(regions, flips[mine])
            logits = self.cls(self.net(self._pool5(regions)))
            loss = F.cross_entropy(logits, labels[picked].to(self.device), reduction="sum")
            return loss / len(batch)

        # Every layer trains (pascal_finetune_train.prototxt: blobs_lr 1 throughout); the new
        # classifier at cls_lr_mult.
        groups = param_groups([(self.net, 1.0), (self.cls, cfg.cls_lr_mult)], cfg.solver)
        losses = run_sgd(groups, cfg.solver, loss_fn, "rcnn fine-tune")
        self.net.eval()
        return losses

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
        size = (image.shape[0], image.shape[1])
        regress = variant != "no_bbox_reg"
        budget = self.test_budget()
        return svm_detections(
            fc7, pool5, proposals, self.svms, self.cfg, size, timer, regress, budget
        )

    @classmethod
    def fidelity(cls, cfg: RCNNConfig) -> list[Setting]:
        """R-CNN's fine-tuning, sampling and test-time settings beside rbgirshick/rcnn's."""
        solver = f"{RCNN_REPO} finetuning/voc_2007_prototxt/pascal_finetune_solver.prototxt"
        train = f"{RCNN_REPO} finetuning/voc_2007_prototxt/pascal_finetune_train.prototxt"
        snapshot = f"{RCNN_REPO} README.md:203 (the 70k snapshot; the solver allows 100k)"
        originals = {
            "lr": (0.001, f"{solver}:5"),
            "lr_step": (20000, f"{solver}:6-8"),
            "momentum": (0.9, f"{solver}:11"),
            "weight_decay": (0.0005, f"{solver}:12"),
            "iters": (70000, snapshot),
            "paper_iters": (70000, snapshot),
            "bias_lr_mult": (2.0, f"{train}:26"),
            "bias_decay": (False, f"{train}:28"),
        }
        rows = [
            setting("rcnn", name, original, source, value)
            for name, original, source, value in (
                (
                    "new classifier (fc8) learning-rate multiplier",
                    10.0,
                    f"{train}:300-301 (bias 20)",
                    cfg.cls_lr_mult,
                ),
                ("layers frozen", "none", f"{train}:25-28 (blobs_lr 1 on every layer)", "none"),
                ("regions mirrored at random (p 1/2)", True, f"{train}:12", cfg.mirror),
                ("regions per fine-tuning batch", 128, f"{train}:10", cfg.batch_size),
                ("foreground fraction", 0.25, f"{train}:15", cfg.fg_fraction),
                ("foreground IoU", 0.5, f"{train}:13", cfg.fg_iou),
                ("context padding (px at 227)", 16, f"{train}:16", cfg.context_pad),
            )
        ]
        test = f"{RCNN_REPO} rcnn_test.m"
        test_rows = test_time_rows(
            "rcnn",
            cfg,
            {
                "rule": f"{test}:44-103",
                "per_image": f"{test}:47,79-80",
                "per_set": f"{test}:44-46",
                "threshold": f"{test}:49,75,99 (a rising per-class threshold only)",
                "nms": f"{RCNN_REPO} imdb/imdb_eval_voc.m:35-36,62",
            },
        )
        return [*solver_rows("rcnn", cfg.solver, originals), *rows, *test_rows]
