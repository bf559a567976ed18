"""R-CNN (Girshick et al., 2014): warped regions, a fine-tuned CNN, per-class SVMs, box regressors.

Shapes: R regions of one image, S input side, C trunk channels, P pool5 side, D fc7 width, K classes.
    warp:       (3, H, W) image, (R, 4) boxes -> (R, 3, S, S)
    conv:       (R, 3, S, S) -> trunk (R, C, S/16, S/16) -> max pool -> pool5 (R, C, P, P)
    fc:         pool5 -> fc7 (R, D)
    classifier: fc7 * scale -> SVM scores (R, K)
    bbox_reg:   pool5 * scale of the kept boxes -> moved boxes

Training stages: fine-tuning on warped regions (K+1-way softmax, 128-region batches of 32 foreground
and 96 background, each region mirrored with probability 1/2; every layer trains, biases at twice the
rate without weight decay, the new classifier at 10x), fc7/pool5 feature extraction (fc7 into an
on-disk cache, or recomputed while mining: ``features``), SVMs with hard-negative mining, ridge box
regressors. Test: SVM scores, the originals' adaptive per-class candidate budget (or a fixed
threshold), box regression, NMS 0.3.

Variants (the R-CNN paper's ablations, Table 2 and appendix B): SVMs on pool5, fc6 or fc7 of the
fine-tuned network or of the initial one ("_no_ft"), each with the network cut after that layer and
without box regression; the fine-tuned network's own softmax instead of SVMs ("softmax"); the default
model without box regression ("no_bbox_reg"). Their SVMs train after the default model's
(``fit_variants``), each on features of its own layer, kept or recomputed as ``features`` says.
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
from pipelines.backbones import Backbone, truncate
from pipelines.bbox_regression import BoxRegressors, fit_box_regressors, regression_examples
from pipelines.detector import (
    TEST_TOPK,
    Detections,
    Detector,
    ScoreBudget,
    TrainData,
    candidates,
    free_disk,
    normalize_image,
    select,
    test_time_rows,
)
from pipelines.fidelity import RCNN_REPO, Setting, setting
from pipelines.progress import progress
from pipelines.registry import BuildContext, PaperFigures, register
from pipelines.sampling import Matches, RegionIndex, match, with_ground_truth
from pipelines.svm import SVMConfig, negative_mask, train_svms
from pipelines.timing import StageTimer
from pipelines.training import SolverConfig, param_groups, run_sgd, solver_rows
from pipelines.warp import warp_regions

__all__ = [
    "FEATURE_STRATEGIES",
    "RCNN",
    "RCNN_VARIANTS",
    "REGION_BYTES",
    "FeatureCache",
    "RCNNConfig",
    "RCNNVariant",
    "SVMHead",
    "SVMSettings",
    "cache_features",
    "choose_features",
    "mirror_regions",
    "ranked_detections",
    "svm_cache_bytes",
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

# Where the SVM stage keeps each training region's fc7 (a pipeline config's ``features``): "disk" writes
# them to a float16 cache once and reads it while mining; "none" keeps none and recomputes an image's
# features when mining reaches it (the same float16 values, so the same SVMs); "auto" takes "disk" when
# the cache folder's free space holds AUTO_DISK_MARGIN times the cache, else "none".
FEATURE_STRATEGIES = ("disk", "none", "auto")
AUTO_DISK_MARGIN = 1.25


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
    softmax_thresh: float = 0.01  # "fixed", "softmax" variant: the probability a pair needs
    max_per_class: int = 100  # "fixed": detections kept per class and image, after NMS
    nms_iou: float = 0.3
    region_batch: int = 256  # warped regions per forward pass
    keep_feature_cache: bool = False  # keep the on-disk fc7/pool5 cache after training
    features: str = "disk"  # training fc7: "disk" (a cache), "none" (recomputed to mine), "auto"
    variants: tuple[str, ...] = ("all",)  # the test-time variants to train, time and score

    def __post_init__(self):
        check_features(self.features)
        if self.test_topk not in TEST_TOPK:
            raise ValueError(f"test_topk must be one of {TEST_TOPK}, got {self.test_topk!r}")
        if self.cls_lr_mult < 0:
            raise ValueError(f"cls_lr_mult must be >= 0, got {self.cls_lr_mult}")


@dataclass
class FeatureCache:
    """Training-set features, and what the SVMs and box regressors need of each region (R-CNN's, and
    SPPnet's, which trains the same SVMs and regressors on its own features).

    Attributes:
        folder: where the files are.
        offsets: int64 (N + 1,): image i's regions are rows offsets[i]:offsets[i + 1] of ``fc7``.
        fc7: float16 (sum R, D), memory-mapped: every training region's fc7; None with features
            "none", where ``recompute`` gives an image's instead.
        recompute: i -> float16 (R, D), image i's fc7 computed afresh (None with a cache on disk).
        neg_masks: per image, bool (R, K): which regions are SVM negatives of which class.
        pos_fc7: float16 (P, D): fc7 of the ground-truth regions (the SVM positives).
        pos_labels: int64 (P,): their classes 1..K.
        pool5: float16 (M, F), memory-mapped: the box-regression features of the examples (R-CNN's
            pool5, F = C*P*P; SPPnet's pooled pyramid).
        reg_boxes, reg_gt, reg_labels, reg_iou: the examples' regions (M, 4), best ground-truth boxes
            (M, 4), classes (M,) and overlaps (M,).
        fc7_scale, pool5_scale: the factors that bring the mean L2 norm of each to ``feature_norm``.
    """

    folder: Path
    offsets: np.ndarray
    fc7: np.ndarray | None
    recompute: Callable[[int], np.ndarray] | None
    neg_masks: list[np.ndarray]
    pos_fc7: np.ndarray
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
        if self.fc7 is None:
            raw = self.recompute(i)
        else:
            raw = self.fc7[self.offsets[i] : self.offsets[i + 1]]
        return np.asarray(raw, np.float32) * self.fc7_scale, self.neg_masks[i]


class SVMSettings(Protocol):
    """The settings the SVM stage reads from a pipeline's config (RCNNConfig, SPPnetConfig)."""

    feature_norm: float
    svm: SVMConfig
    svm_neg_iou: float
    bbox_lambda: float
    bbox_min_iou: float
    keep_feature_cache: bool
    features: str
    score_thresh: float
    nms_iou: float
    max_per_class: int


@dataclass
class SVMHead:
    """What the SVM stage trains: per-class SVMs on scaled features (fc7, or a variant's layer) and
    box regressors on scaled features.

    Attributes:
        weight: Tensor[D, K]; bias: Tensor[K]: the SVMs.
        fc7_scale: the factor that brings the SVM features' mean L2 norm to ``feature_norm``.
        reg_scale: the same factor for the box-regression features (R-CNN's pool5).
        regressors: the class-specific box regressors (None: a head trained without them).
    """

    weight: Tensor
    bias: Tensor
    fc7_scale: float
    reg_scale: float
    regressors: BoxRegressors | None

    def tensors(self, with_regressors: bool = True) -> list[Tensor]:
        """What runs at test time: the SVMs, and (unless left out) the box regressors."""
        reg = self.regressors
        return [self.weight, self.bias] + (
            [reg.weight, reg.bias, reg.t_inv, reg.mu] if with_regressors and reg else []
        )

    def to(self, device: torch.device) -> SVMHead:
        return SVMHead(
            self.weight.to(device),
            self.bias.to(device),
            self.fc7_scale,
            self.reg_scale,
            None if self.regressors is None else self.regressors.to(device),
        )


# Returns the SVM features (R, D: fc7, or a variant's layer) and the box-regression features (R, F;
# F = 0 for a head trained without box regressors) of image i's boxes (R, 4).
FeatureFn = Callable[[int, Tensor], tuple[Tensor, Tensor]]


def check_features(features: str) -> None:
    """Raise ValueError unless ``features`` is one of FEATURE_STRATEGIES (a config's ``features``)."""
    if features not in FEATURE_STRATEGIES:
        raise ValueError(f"features must be one of {FEATURE_STRATEGIES}, got {features!r}")


def choose_features(features: str, fc7_bytes: int, free_bytes: int) -> str:
    """The strategy a run takes: ``features`` itself unless "auto", which takes "disk" when
    ``free_bytes`` >= AUTO_DISK_MARGIN * ``fc7_bytes`` (the cache with room to spare), else "none"."""
    if features != "auto":
        return features
    return "disk" if free_bytes >= AUTO_DISK_MARGIN * fc7_bytes else "none"


# Memory per training region: its box and match (16 + 4 + 8 + 8 bytes), R-CNN's concatenated copy for
# sampling (8 + 16 + 4 + 8) and the SVMs' negative mask (a byte per class: 20 for VOC), rounded up.
REGION_BYTES = 96

# Box-regression examples (IoU > 0.6 with a ground-truth box) are a small share of the regions: the
# disk estimate allows this much of them.
REGRESSION_SHARE = 0.1


def svm_cache_bytes(
    features: str, regions: int, fc_dim: int, reg_dim: int, free_bytes: int | None = None
) -> int:
    """An upper estimate of the SVM stage's disk cache, float16: fc7 (2 * regions * fc_dim bytes) unless
    the strategy keeps none, and the regression features of REGRESSION_SHARE of the regions
    (2 * REGRESSION_SHARE * regions * reg_dim), which every strategy keeps on disk.

    Args:
        features: the config's strategy; "auto" is resolved with ``free_bytes`` (None: as "none",
            the least it keeps).
        regions: training regions over the split (images x regions per image).
        fc_dim: D, the SVM features' width; reg_dim: F, the box-regression features' width.
    """
    fc7 = 2 * regions * fc_dim
    chosen = choose_features(features, fc7, -1 if free_bytes is None else free_bytes)
    return int((fc7 if chosen == "disk" else 0) + 2 * REGRESSION_SHARE * regions * reg_dim)


def train_svm_head(
    features_of: FeatureFn,
    fc_dim: int,
    data: TrainData,
    regions: tuple[list[Tensor], list[tuple[Tensor, Tensor]], list[Matches]],
    cfg: SVMSettings,
    work: Path,
    timer: StageTimer,
    regress: bool = True,
) -> tuple[SVMHead, dict]:
    """R-CNN's steps after fine-tuning, which SPPnet repeats on its own features and the variants
    (R-CNN's other layers, Fast R-CNN's post-hoc SVMs) on theirs: extract every training region's
    features, keeping them in an on-disk cache or not (``cfg.features``; "features"), mine hard
    negatives for the SVMs ("svm"; without a cache, each image's features are computed again here),
    fit the box regressors ("bbox_reg", with ``regress``); the cache is removed afterwards unless
    ``keep_feature_cache``.

    Args:
        features_of: the features of image i's boxes.
        fc_dim: D, the width of the SVM features it returns.
        data: the training split.
        regions: per image, its training regions (Tensor[R, 4], ground truth first), ground-truth boxes
            and labels, and the regions' matches to them.
        cfg: the pipeline's settings.
        work: the cache folder to create.
        timer: receives the stages.
        regress: fit box regressors; False: the head has none (``features_of`` returns F = 0).

    Returns:
        (the trained head, facts to record: the strategy taken, cache size, feature scales, mining
        records, examples).
    """
    fc7_bytes = 2 * fc_dim * sum(len(r) for r in regions[0])
    strategy = choose_features(cfg.features, fc7_bytes, free_disk(work.parent))
    print(
        f"[rcnn-bench] {work.name.split('-')[0]} features: {strategy} (requested {cfg.features}; "
        f"an fc7 cache would take {fc7_bytes / 2**30:.2f} GiB)",
        flush=True,
    )
    try:
        with timer.stage("features"):
            cache = cache_features(
                features_of, fc_dim, data, *regions, cfg, work, strategy == "disk"
            )
        with timer.stage("svm"):
            pos_all = np.asarray(cache.pos_fc7, np.float32) * cache.fc7_scale
            positives = [pos_all[cache.pos_labels == j + 1] for j in range(data.num_classes)]
            w, b, records = train_svms(positives, cache, cfg.svm)
        regressors = None
        if regress:
            with timer.stage("bbox_reg"):
                regressors = fit_box_regressors(
                    cache.pool5,
                    cache.reg_boxes,
                    cache.reg_gt,
                    cache.reg_labels,
                    cache.reg_iou,
                    data.num_classes,
                    lam=cfg.bbox_lambda,
                    min_iou=cfg.bbox_min_iou,
                    scale=cache.pool5_scale,
                )
        cache_bytes = cache.bytes
    finally:
        if not cfg.keep_feature_cache:
            shutil.rmtree(work, ignore_errors=True)
    head = SVMHead(
        torch.from_numpy(w), torch.from_numpy(b), cache.fc7_scale, cache.pool5_scale, regressors
    )
    info = {
        "features": strategy,
        "feature_cache_bytes": cache_bytes,
        "feature_cache_regions": int(cache.offsets[-1]),
        "feature_norm_scale": {"svm": cache.fc7_scale},
        "svm": [{"class": j + 1, **asdict(r)} for j, r in enumerate(records)],
    }
    if regressors is not None:
        info["feature_norm_scale"]["bbox_reg"] = cache.pool5_scale
        info["bbox_examples"] = regressors.examples
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
    keep_fc7: bool = True,
) -> FeatureCache:
    """One pass over the training images: the regression features of the box-regression examples go to
    disk, fc7 of every region too with ``keep_fc7`` (both float16, written image by image: neither is
    ever whole in memory), fc7 of the ground-truth regions stays in memory, and the mean norms give
    the feature scales. Without ``keep_fc7`` the cache recomputes an image's fc7 when asked (rounded to
    float16, as the file would hold it). Which regions are SVM negatives (pipelines.svm.negative_mask)
    and which are box-regression examples (pipelines.bbox_regression.regression_examples) is decided by
    those modules; this only extracts and stores."""
    work.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(r) for r in rois])
    fc7_file = None
    if keep_fc7:
        fc7_file = np.lib.format.open_memmap(
            work / "fc7.npy", "w+", np.float16, (int(offsets[-1]), fc_dim)
        )
    examples = [
        regression_examples(m, *gt, cfg.bbox_min_iou) for m, gt in zip(matches, gts, strict=True)
    ]
    reg_offsets = np.cumsum([0] + [len(ex.rows) for ex in examples])
    reg_file = None  # opened at the first image, which tells the regression features' width
    pos_fc7, neg_masks = [], []
    norm7 = norm5 = 0.0
    for i in progress(range(len(rois)), f"{work.name.split('-')[0]} features", "img"):
        fc7, pool5 = (f.cpu() for f in features_of(i, rois[i]))
        fc7_16 = fc7.numpy().astype(np.float16)
        if fc7_file is not None:
            fc7_file[offsets[i] : offsets[i + 1]] = fc7_16
        pos_fc7.append(fc7_16[: len(gts[i][0])])  # the ground-truth regions come first
        norm7 += float(fc7.norm(dim=1).sum())
        norm5 += float(pool5.norm(dim=1).sum())
        ann = data.annotations[i]
        neg_masks.append(
            negative_mask(rois[i], ann.boxes, ann.labels, data.num_classes, cfg.svm_neg_iou)
        )
        if reg_file is None:
            reg_file = np.lib.format.open_memmap(
                work / "pool5.npy", "w+", np.float16, (int(reg_offsets[-1]), pool5.shape[1])
            )
        rows = torch.from_numpy(examples[i].rows)
        reg_file[reg_offsets[i] : reg_offsets[i + 1]] = pool5[rows].numpy().astype(np.float16)
    for f in (fc7_file, reg_file):
        if f is not None:
            f.flush()
    n = max(int(offsets[-1]), 1)
    all_rois = torch.cat(rois).numpy()

    def recompute(i: int) -> np.ndarray:
        return features_of(i, rois[i])[0].cpu().numpy().astype(np.float16)

    return FeatureCache(
        folder=work,
        offsets=offsets,
        fc7=np.load(work / "fc7.npy", mmap_mode="r") if keep_fc7 else None,
        recompute=None if keep_fc7 else recompute,
        neg_masks=neg_masks,
        pos_fc7=np.concatenate(pos_fc7),
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
    """The test-time steps after the features: SVM scores ("classifier"), then ``ranked_detections``
    at the fixed ``score_thresh`` (without a budget).

    Args:
        fc7 (Tensor[R, D]), reg_features (Tensor[R, F]): the proposals' features, unscaled (fc7, or
            the layer a variant's SVMs read).
        proposals (Tensor[R, 4]): in image pixels.
        head: the trained SVMs and regressors, on the features' device.
        cfg: NMS overlap; without a budget, the score threshold and detections kept per class.
        size: the image's (H, W).
        timer: receives the "classifier", "bbox_reg" and "nms" stages.
        regress: False leaves the boxes where the proposals are (the "no_bbox_reg" variant).
        budget: the originals' adaptive candidate budget (Detector.test_budget); None: the fixed
            ``score_thresh``, and at most ``max_per_class`` per class after NMS.
    """
    with timer.stage("classifier"):
        scores = (fc7 * head.fc7_scale) @ head.weight + head.bias  # (R, K)

    def move(rows: Tensor, boxes: Tensor, cls: Tensor) -> Tensor:
        return head.regressors.predict(reg_features[rows] * head.reg_scale, boxes, cls)

    return ranked_detections(
        scores, proposals, cfg.score_thresh, cfg, size, timer, budget, move if regress else None
    )


# Moves the candidates' boxes: (rows into the proposals (M,), their boxes (M, 4), classes (M,) 0-based)
# -> regressed boxes (M, 4).
RegressFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def ranked_detections(
    scores: Tensor,
    proposals: Tensor,
    score_thresh: float,
    cfg: SVMSettings,
    size: tuple[int, int],
    timer: StageTimer,
    budget: ScoreBudget | None = None,
    regress: RegressFn | None = None,
) -> Detections:
    """The test-time steps after the scores, whatever scored the regions (SVMs, a softmax): the
    candidate (region, class) pairs ("classifier"), their box regression ("bbox_reg"), NMS ("nms").

    Args:
        scores (Tensor[R, K]): per-class scores of the proposals.
        proposals (Tensor[R, 4]): in image pixels.
        score_thresh: without a budget, the score a candidate needs.
        cfg: NMS overlap; without a budget, the detections kept per class.
        size: the image's (H, W).
        timer: receives the three stages.
        budget: the originals' adaptive candidate budget (Detector.test_budget); None: the fixed
            ``score_thresh``, and at most ``max_per_class`` per class after NMS.
        regress: moves the candidates' boxes; None leaves them where the proposals are.
    """
    with timer.stage("classifier"):
        if budget is None:
            rows, cls = candidates(scores, score_thresh)
        else:
            rows, cls = budget.candidates(scores)
    with timer.stage("bbox_reg"):
        boxes = proposals[rows]
        if regress is not None:
            boxes = regress(rows, boxes, cls)
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


@dataclass(frozen=True)
class RCNNVariant:
    """What one of R-CNN's test-time models runs.

    Attributes:
        layer: the layer the network is cut after and the classifier reads ("pool5", "fc6", "fc7").
        finetuned: the fine-tuned network; False: the initial weights (ImageNet's in the paper).
        softmax: the fine-tuning classifier's softmax scores the regions, not SVMs.
        regress: box regression (on pool5 of the fine-tuned network).
    """

    layer: str = "fc7"
    finetuned: bool = True
    softmax: bool = False
    regress: bool = False


# The default model (None) and the variants. The R-CNN paper's Table 2 trains SVMs on pool5, fc6 and
# fc7, without fine-tuning and with, all without box regression but for its last row ("FT fc7 BB", the
# default); its appendix B scores with the fine-tuned softmax instead of SVMs (also without).
RCNN_VARIANTS: dict[str | None, RCNNVariant] = {
    None: RCNNVariant(regress=True),
    "no_bbox_reg": RCNNVariant(),
    "softmax": RCNNVariant(softmax=True),
    "fc6": RCNNVariant("fc6"),
    "pool5": RCNNVariant("pool5"),
    "fc7_no_ft": RCNNVariant(finetuned=False),
    "fc6_no_ft": RCNNVariant("fc6", finetuned=False),
    "pool5_no_ft": RCNNVariant("pool5", finetuned=False),
}


@register
class RCNN(Detector):
    """R-CNN behind the Detector interface: fine-tunes a copy of the shared backbone, caches its
    training-set features in ``context.cache_dir`` while the SVMs and box regressors train."""

    name = "rcnn"
    label = "R-CNN"
    config_class = RCNNConfig
    keeps_threshold_ties = True  # rcnn_test.m:99 drops only the detections below the threshold
    variants = tuple(v for v in RCNN_VARIANTS if v is not None)
    # R-CNN paper (Girshick et al. 2014, arXiv v5), Table 2 and appendix B: AlexNet, VOC 2007 test.
    variant_papers: ClassVar[dict[str, str]] = {
        "default": "58.5 (R-CNN paper, Table 2: FT fc7 BB; AlexNet, VOC07 test)",
        "no_bbox_reg": "54.2 (R-CNN paper, Table 2: FT fc7; AlexNet)",
        "softmax": "50.9 (R-CNN paper, appendix B: FT softmax; AlexNet)",
        "fc6": "53.1 (R-CNN paper, Table 2: FT fc6; AlexNet)",
        "pool5": "47.3 (R-CNN paper, Table 2: FT pool5; AlexNet)",
        "fc7_no_ft": "44.7 (R-CNN paper, Table 2: fc7; AlexNet)",
        "fc6_no_ft": "46.2 (R-CNN paper, Table 2: fc6; AlexNet)",
        "pool5_no_ft": "44.2 (R-CNN paper, Table 2: pool5; AlexNet)",
    }
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
        # The initial weights, kept only for the variants without fine-tuning.
        self.initial: Backbone | None = None
        if any(not RCNN_VARIANTS[v].finetuned for v in self.enabled_variants()):
            self.initial = context.backbone().to(self.device).eval()
        self.cache_dir = Path(context.cache_dir)
        self.svms: dict[tuple[str, bool], SVMHead] = {}  # by (layer, fine-tuned)
        distributed.check_split(cfg.batch_size, f"pipelines.{self.name}.batch_size")

    def _network(self, spec: RCNNVariant) -> Backbone:
        """The network ``spec`` runs: the fine-tuned or the initial one, cut after its layer."""
        net = self.net if spec.finetuned else self.initial
        if net is None:
            raise ValueError(
                "rcnn: a variant without fine-tuning runs only when pipelines.rcnn.variants "
                "enables it (the initial weights are kept for those only)"
            )
        return truncate(net, spec.layer)

    def test_modules(self, variant: str | None = None) -> list[nn.Module]:
        spec = RCNN_VARIANTS[variant]
        # The fine-tuning classifier runs at test time only in the "softmax" variant.
        return [self._network(spec), *([self.cls] if spec.softmax else [])]

    def test_tensors(self, variant: str | None = None) -> list[Tensor]:
        spec = RCNN_VARIANTS[variant]
        head = None if spec.softmax else self.svms.get((spec.layer, spec.finetuned))
        return head.tensors(with_regressors=spec.regress) if head else []

    @classmethod
    def cache_bytes(
        cls,
        cfg: RCNNConfig,
        train_images: int,
        regions_per_image: int,
        backbone: Backbone,
        free_bytes: int | None = None,
    ) -> int:
        """The largest of the feature caches, each removed before the next is written
        (svm_cache_bytes, float16): the default model's, fc7 of every training region unless
        ``features`` keeps none and pool5 of the box-regression examples; each enabled SVM variant's,
        its layer of every region."""
        pool5 = backbone.channels * backbone.pool_size**2
        regions = train_images * regions_per_image
        widths = {"pool5": pool5, "fc6": backbone.fc_dim, "fc7": backbone.fc_dim}
        sizes = [svm_cache_bytes(cfg.features, regions, backbone.fc_dim, pool5, free_bytes)]
        for variant in cls.chosen_variants(cfg):
            spec = RCNN_VARIANTS[variant]
            if not spec.softmax:
                width = widths[spec.layer]
                sizes.append(svm_cache_bytes(cfg.features, regions, width, 0, free_bytes))
        return max(sizes)

    @classmethod
    def train_ram_bytes(
        cls, cfg: RCNNConfig, train_images: int, regions_per_image: int, backbone: Backbone
    ) -> int:
        """The training regions, REGION_BYTES each."""
        return train_images * regions_per_image * REGION_BYTES

    # -- the network on warped regions -----------------------------------------------------------

    def _warp(self, image: Tensor, boxes: Tensor) -> Tensor:
        return warp_regions(image, boxes, self.net.input_size, self.cfg.context_pad)

    @torch.no_grad()
    def _features(
        self, net: Backbone, image: Tensor, boxes: Tensor, timer: StageTimer
    ) -> tuple[Tensor, Tensor]:
        """``net``'s output (R, D) and flattened pool5 (R, C*P*P) of every box of one normalized
        image, in chunks of ``region_batch`` regions; ``timer`` gets the warp, conv and fc stages."""
        out, pool5 = [], []
        for chunk in boxes.split(self.cfg.region_batch):
            with timer.stage("warp"):
                regions = self._warp(image, chunk)
            with timer.stage("conv"):
                p5 = net.pool5(regions)
            with timer.stage("fc"):
                out.append(net(p5))
            pool5.append(p5.flatten(1))
        if not out:
            d5 = net.channels * net.pool_size**2
            return image.new_zeros((0, net.fc_dim)), image.new_zeros((0, d5))
        return torch.cat(out), torch.cat(pool5)

    def _features_of(
        self, net: Backbone, data: TrainData, rois: list[Tensor], regress: bool
    ) -> FeatureFn:
        """The training images' features for ``train_svm_head``: ``net``'s output, and pool5 for
        box regression (none without ``regress``), of image i's training regions ``rois[i]``.

        Under torchrun the processes extract the images in turn and share the features
        (distributed.in_rounds), so the returned function must be called with ``rois[i]``.
        """

        def extract(i: int) -> tuple[Tensor, Tensor]:
            image = normalize_image(torch.from_numpy(data.images[i]).to(self.device))
            boxes = rois[i].to(self.device)
            out, pool5 = self._features(net, image, boxes, StageTimer(self.device))
            return out.cpu(), (pool5 if regress else pool5[:, :0]).cpu()

        extracted = distributed.in_rounds(extract, len(data.images))

        def features_of(i: int, boxes: Tensor) -> tuple[Tensor, Tensor]:
            if len(boxes) != len(rois[i]):
                raise ValueError(
                    f"features_of({i}): asked for other boxes than the training regions"
                )
            return extracted(i)

        return features_of

    def _work(self, variant: str) -> Path:
        # The process id ends the name: a later run removes the folder if this process was killed.
        return self.cache_dir / f"{variant}-features-{id(self):x}-work-{os.getpid()}"

    # -- training ---------------------------------------------------------------------------------

    def fit(self, data: TrainData, timer: StageTimer) -> dict:
        regions = training_regions(data, self.cfg.fg_iou)
        with timer.stage("finetune"):
            losses = self._finetune(data, regions[0], regions[2])
        features_of = self._features_of(self.net, data, regions[0], regress=True)
        svms, info = train_svm_head(
            features_of, self.net.fc_dim, data, regions, self.cfg, self._work("rcnn"), timer
        )
        self.svms[("fc7", True)] = svms.to(self.device)
        return {"finetune_final_loss": float(np.mean(losses[-50:])), **info}

    def fit_variants(self, data: TrainData, timer: StageTimer) -> dict:
        """SVMs on the layer of each enabled variant that has no SVMs yet, with the default's SVM
        stage (``train_svm_head``, without box regression), each on a cache of that layer only."""
        todo = [
            v
            for v in self.enabled_variants()
            if not RCNN_VARIANTS[v].softmax
            and (RCNN_VARIANTS[v].layer, RCNN_VARIANTS[v].finetuned) not in self.svms
        ]
        regions = training_regions(data, self.cfg.fg_iou) if todo else None
        info = {}
        for variant in todo:
            spec = RCNN_VARIANTS[variant]
            net = self._network(spec)
            stages = StageTimer(self.device)
            features_of = self._features_of(net, data, regions[0], regress=False)
            work = self._work(f"rcnn_{variant}")
            head, info[variant] = train_svm_head(
                features_of, net.fc_dim, data, regions, self.cfg, work, stages, regress=False
            )
            timer.add(stages, variant)
            self.svms[(spec.layer, spec.finetuned)] = head.to(self.device)
        return info

    def _finetune(self, data: TrainData, rois: list[Tensor], matches: list[Matches]):
        """K+1-way softmax fine-tuning on warped regions drawn across the whole training set (indexed
        once: a batch costs its own size, not the set's)."""
        cfg = self.cfg
        image_of = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rois)])
        boxes = torch.cat(rois)
        iou = torch.cat([m.iou for m in matches])
        labels = torch.cat([m.labels for m in matches])
        index = RegionIndex.build(iou, cfg.fg_iou, (0.0, cfg.fg_iou))
        gen = torch.Generator().manual_seed(cfg.solver.seed)
        self.net.train()

        def loss_fn(_: int) -> Tensor:
            fg, bg = index.sample(cfg.batch_size, cfg.fg_fraction, gen)
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
            logits = self.cls(self.net(self.net.pool5(regions)))
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
        spec = RCNN_VARIANTS[variant]
        with timer.stage("preprocess"):
            x = normalize_image(image)
        out, pool5 = self._features(self._network(spec), x, proposals, timer)
        size = (image.shape[0], image.shape[1])
        budget = self.test_budget()
        if spec.softmax:
            with timer.stage("classifier"):
                probs = F.softmax(self.cls(out), dim=1)[:, 1:]  # (R, K)
            thresh = self.cfg.softmax_thresh
            return ranked_detections(probs, proposals, thresh, self.cfg, size, timer, budget)
        svms = self.svms[(spec.layer, spec.finetuned)]
        return svm_detections(
            out, pool5, proposals, svms, self.cfg, size, timer, spec.regress, budget
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
