"""R-CNN's SVM stage, which SPPnet repeats on its own features and Fast R-CNN's "svm" variant on fc7: a
feature cache of every training region, per-class SVMs with hard-negative mining (parts.svm), ridge box
regressors (parts.bbox_regression), and the test-time steps that rank SVM (or softmax) scores.

Shapes: N training images, R regions of one image, D SVM feature width (fc7, or a variant's layer), F
box-regression feature width (R-CNN's pool5 C*P*P, SPPnet's pyramid), K classes, M candidates.
    training:   image i's regions (R, 4) -> features (R, D), (R, F) -> cache, float16 ->
                SVMs (D, K) + (K,), box regressors on the examples' (M, F)
    test:       features (R, D) * scale -> SVM scores (R, K) -> candidates (M,) -> regressed boxes
                (M, 4) -> per-class NMS
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from rcnn_bench.pipelines.parts.bbox_regression import (
    BoxRegressors,
    fit_box_regressors,
    regression_examples,
)
from rcnn_bench.pipelines.parts.detections import Detections, TrainData
from rcnn_bench.pipelines.parts.sampling import Matches
from rcnn_bench.pipelines.parts.scoring import ScoreBudget, candidates, select
from rcnn_bench.pipelines.parts.svm import SVMConfig, negative_mask, train_svms
from rcnn_bench.pipelines.runtime.disk import free_disk
from rcnn_bench.pipelines.runtime.progress import progress
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import Tensor

__all__ = [
    "FEATURE_STRATEGIES",
    "REGION_BYTES",
    "FeatureCache",
    "FeatureFn",
    "RankSettings",
    "SVMHead",
    "SVMSettings",
    "SVMStageConfig",
    "cache_features",
    "check_features",
    "choose_features",
    "ranked_detections",
    "svm_cache_bytes",
    "svm_detections",
    "train_svm_head",
]


# Where the SVM stage keeps each training region's fc7 (a pipeline config's ``features``): "disk" writes
# them to a float16 cache once and reads it while mining; "none" keeps none and recomputes an image's
# features when mining reaches it (the same float16 values, so the same SVMs); "auto" takes "disk" when
# the cache folder's free space holds AUTO_DISK_MARGIN times the cache, else "none".
FEATURE_STRATEGIES = ("disk", "none", "auto")
AUTO_DISK_MARGIN = 1.25


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
    """What the SVM stage's training reads from a pipeline's config (RCNNConfig, SPPnetConfig) or from
    an SVMStageConfig."""

    feature_norm: float
    svm: SVMConfig
    svm_neg_iou: float
    bbox_lambda: float
    bbox_min_iou: float
    keep_feature_cache: bool
    features: str


@dataclass(frozen=True)
class SVMStageConfig:
    """The SVM stage's settings for a pipeline whose config block holds only the SVM solver's (Fast
    R-CNN's "svm" variant): R-CNN's feature scaling, negatives' overlap, box-regression examples and
    feature cache, as RCNNConfig's defaults."""

    svm: SVMConfig = field(default_factory=SVMConfig)
    feature_norm: float = 20.0  # features are scaled so their mean L2 norm is this
    svm_neg_iou: float = 0.3  # SVM negatives overlap every box of the class less than this
    bbox_lambda: float = 1000.0  # ridge penalty
    bbox_min_iou: float = 0.6  # box-regression examples overlap a ground-truth box more than this
    keep_feature_cache: bool = False  # keep the on-disk feature cache after training
    features: str = "disk"  # training features: "disk" (a cache), "none" (recomputed), "auto"

    def __post_init__(self):
        check_features(self.features)


class RankSettings(Protocol):
    """What the test-time steps after the scores read from a pipeline's config (svm_detections,
    ranked_detections)."""

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
    float16, as the file would hold it). Which regions are SVM negatives (parts.svm.negative_mask)
    and which are box-regression examples (parts.bbox_regression.regression_examples) is decided by
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
    cfg: RankSettings,
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
    cfg: RankSettings,
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
