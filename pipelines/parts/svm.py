"""R-CNN's per-class linear SVMs, trained with hard-negative mining (rcnn_train.m).

Shapes: R regions of one image, D feature width (fc7), K classes.

Positives are the ground-truth boxes of a class. Negatives are regions overlapping every box of that
class by less than 0.3. The images are visited once, in order: the first image's negatives are all kept;
on later images a negative joins a class's cache when the current SVM scores it above -1.0001 (inside
the margin). A class is retrained when more than 2000 negatives have joined since its last training,
and after the last image; after each retraining, cached negatives scoring below -1.2 are evicted.
Each SVM is liblinear's L2-regularised hinge-loss SVM (scikit-learn's LinearSVC) with C = 1e-3,
positive weight 2 and intercept scaling 10, stopped as liblinear stops it by default (a dual violation
of 0.1, at most 1000 iterations).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from rcnn_bench.pipelines.parts.boxes import box_iou
from rcnn_bench.pipelines.runtime.progress import progress
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC
from torch import Tensor

__all__ = ["ClassRecord", "SVMConfig", "negative_mask", "train_svms"]


@dataclass(frozen=True)
class SVMConfig:
    """The original's settings (rcnn_train.m)."""

    c: float = 1e-3  # liblinear C
    pos_weight: float = 2.0  # weight of the positive class in the loss
    bias_scale: float = 10.0  # liblinear -B: the constant feature the bias multiplies
    hard_thresh: float = -1.0001  # a negative scoring above this joins the cache
    evict_thresh: float = -1.2  # after retraining, cached negatives scoring below this leave
    retrain_limit: int = 2000  # retrain once more than this many negatives joined
    # liblinear's own stopping rule for its dual hinge-loss solver (-s 3), which neither original
    # overrides: a maximal dual violation of 0.1 (liblinear-1.94/matlab/train.c:228-231 in R-CNN,
    # liblinear-1.93_multicore/matlab/train.cpp:197-200 in SPPnet) within 1000 iterations
    # (linear.cpp:787 and :788, solve_l2r_l1l2_svc). scikit-learn's defaults are 1e-4 and 1000.
    tol: float = 0.1
    max_iter: int = 1000  # liblinear iterations per training


@dataclass
class ClassRecord:
    """What mining did for one class."""

    positives: int = 0
    rounds: int = 0  # how many times the SVM was trained
    cached_negatives: int = 0  # negatives in the cache at the end
    negatives_added: int = 0  # negatives that ever joined the cache
    not_converged: int = 0  # trainings where liblinear hit max_iter
    cache_sizes: list[int] = field(default_factory=list)  # cache size after each training


def negative_mask(
    regions: Tensor, gt_boxes: np.ndarray, gt_labels: np.ndarray, num_classes: int, max_iou: float
) -> np.ndarray:
    """Which regions may serve as negatives of which class.

    A region is a negative of class k when it overlaps every ground-truth box of class k, difficult
    ones included, by less than ``max_iou`` (0.3 in rcnn_train.m); with no box of class k, every
    region is.

    Args:
        regions (Tensor[R, 4]): one image's training regions.
        gt_boxes: float32 (G, 4), all of the image's ground-truth boxes.
        gt_labels: int64 (G,), their classes 1..K.
        num_classes: K.
        max_iou: the overlap a negative must stay below.

    Returns:
        bool (R, K).
    """
    ious = box_iou(regions, torch.from_numpy(gt_boxes)).numpy()  # (R, G)
    best = np.zeros((len(regions), num_classes), np.float32)
    for j in range(num_classes):
        cols = gt_labels == j + 1
        if cols.any():
            best[:, j] = ious[:, cols].max(axis=1)
    return best < max_iou


def _fit(
    pos: np.ndarray, neg: np.ndarray, cfg: SVMConfig, record: ClassRecord
) -> tuple[np.ndarray, float]:
    x = np.concatenate((pos, neg)).astype(np.float32)
    y = np.concatenate((np.ones(len(pos)), -np.ones(len(neg))))
    svm = LinearSVC(
        C=cfg.c,
        loss="hinge",
        dual=True,
        class_weight={1: cfg.pos_weight, -1: 1.0},
        intercept_scaling=cfg.bias_scale,
        tol=cfg.tol,
        max_iter=cfg.max_iter,
        random_state=0,  # liblinear's dual solver visits examples in a random order
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(x, y)
    record.not_converged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return svm.coef_[0].astype(np.float32), float(svm.intercept_[0])


def train_svms(
    positives: list[np.ndarray],
    images: Sequence[tuple[np.ndarray, np.ndarray]],
    cfg: SVMConfig,
) -> tuple[np.ndarray, np.ndarray, list[ClassRecord]]:
    """Train one SVM per class with hard-negative mining over the training images.

    Args:
        positives: K arrays, class k's positive features (Pk, D).
        images: per training image, in order (indexable, so that it may load lazily): (features
            (R, D), negative mask (R, K) bool, true where the region may serve as a negative of class k).
        cfg: the mining and SVM settings.

    Returns:
        (weights (D, K), biases (K,), one ClassRecord per class). A class without positives keeps zero
        weights and a bias of -inf (it never fires).
    """
    k = len(positives)
    records = [ClassRecord(positives=len(p)) for p in positives]
    d = next((p.shape[1] for p in positives if p.size), 0)
    weights = np.zeros((d, k), np.float32)
    biases = np.zeros(k, np.float32)
    caches: list[np.ndarray | None] = [None] * k
    added_since = np.zeros(k, dtype=np.int64)
    active = [len(p) > 0 for p in positives]
    for i in progress(range(len(images)), "svm hard-negative mining", "img"):
        feats, neg_mask = images[i]
        first, last = i == 0, i == len(images) - 1
        scores = feats @ weights + biases  # (R, K)
        for j in range(k):
            if not active[j]:
                continue
            take = neg_mask[:, j] if first else neg_mask[:, j] & (scores[:, j] > cfg.hard_thresh)
            new = feats[take]
            if len(new):
                caches[j] = new if caches[j] is None else np.concatenate((caches[j], new))
                added_since[j] += len(new)
                records[j].negatives_added += len(new)
            if caches[j] is None or not (first or last or added_since[j] > cfg.retrain_limit):
                continue
            w, b = _fit(positives[j], caches[j], cfg, records[j])
            weights[:, j], biases[j] = w, b
            added_since[j] = 0
            records[j].rounds += 1
            caches[j] = caches[j][caches[j] @ w + b >= cfg.evict_thresh]
            records[j].cache_sizes.append(len(caches[j]))
    for j in range(k):
        records[j].cached_negatives = 0 if caches[j] is None else len(caches[j])
        if not active[j]:
            biases[j] = -np.inf
    return weights, biases, records
