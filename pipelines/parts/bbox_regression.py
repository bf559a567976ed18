"""R-CNN's class-specific bounding-box regression (appendix C; rcnn_train_bbox_regressor.m).

Shapes: M training regions, F pool5 width (C*P*P), K classes.

For each class, regions whose best ground-truth box is of that class with IoU > 0.6 are the examples;
the targets are the deltas (dx, dy, log dw, log dh) to that box (pipelines.boxes.encode_deltas),
centred and whitened per class as the original did; one ridge regression (lambda = 1000) per class
maps the scaled pool5 features to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rcnn_bench.pipelines.parts.boxes import decode_deltas, encode_deltas
from rcnn_bench.pipelines.parts.sampling import Matches
from sklearn.linear_model import Ridge
from torch import Tensor

__all__ = ["BoxRegressors", "RegressionExamples", "fit_box_regressors", "regression_examples"]


@dataclass
class BoxRegressors:
    """Per-class linear maps from pool5 features to box deltas.

    Attributes:
        weight: Tensor[K, F, 4]; bias: Tensor[K, 4]; un-whitening: deltas = (x W + b) T_inv + mu, with
        t_inv: Tensor[K, 4, 4] and mu: Tensor[K, 4]. trained: Tensor[K] bool (a class with no examples
        leaves its boxes where they are).
    """

    weight: Tensor
    bias: Tensor
    t_inv: Tensor
    mu: Tensor
    trained: Tensor
    examples: list[int]

    def to(self, device: torch.device) -> BoxRegressors:
        return BoxRegressors(
            self.weight.to(device),
            self.bias.to(device),
            self.t_inv.to(device),
            self.mu.to(device),
            self.trained.to(device),
            self.examples,
        )

    def predict(self, features: Tensor, boxes: Tensor, class_index: Tensor) -> Tensor:
        """Regress boxes.

        Args:
            features (Tensor[M, F]): scaled pool5 features of the boxes' regions.
            boxes (Tensor[M, 4]): the proposals.
            class_index (Tensor[M]): 0-based class of each (label - 1).

        Returns:
            Tensor[M, 4]: moved boxes (unchanged for classes with no regressor).

        Every class's map is applied to every row in one product and each row keeps its class's
        deltas: K times the FLOPs of a loop over the rows' classes, but no wait for the device per
        class (on a GPU that loop's host synchronisations cost more than the product).
        """
        k, f, _ = self.weight.shape
        every = features @ self.weight.permute(1, 0, 2).reshape(f, k * 4)  # (M, K*4)
        m = torch.arange(features.shape[0], device=features.device)
        raw = every.view(-1, k, 4)[m, class_index] + self.bias[class_index]  # (M, 4)
        deltas = torch.bmm(raw[:, None], self.t_inv[class_index])[:, 0] + self.mu[class_index]
        moved = decode_deltas(boxes, deltas)
        return torch.where(self.trained[class_index][:, None], moved, boxes)


@dataclass
class RegressionExamples:
    """One image's box-regression examples.

    Attributes:
        rows: int64 (M,), their indices among the image's training regions.
        gt_boxes: float32 (M, 4), each one's best-overlapping ground-truth box.
        labels: int64 (M,), that box's class 1..K.
        iou: float32 (M,), the overlap with it.
    """

    rows: np.ndarray
    gt_boxes: np.ndarray
    labels: np.ndarray
    iou: np.ndarray


def regression_examples(
    matches: Matches, gt_boxes: Tensor, gt_labels: Tensor, min_iou: float
) -> RegressionExamples:
    """The regions whose best ground-truth box overlaps them by more than ``min_iou`` (0.6 in
    rcnn_train_bbox_regressor.m), with that box and its class.

    Args:
        matches: each region's best ground-truth box (pipelines.sampling.match).
        gt_boxes (Tensor[G, 4]); gt_labels (Tensor[G]): the boxes ``matches`` indexes.
        min_iou: the overlap an example needs.
    """
    rows = torch.nonzero(matches.iou > min_iou).flatten()
    if gt_boxes.shape[0] == 0:
        rows = rows[:0]
    index = matches.gt_index[rows]
    return RegressionExamples(
        rows.numpy(),
        gt_boxes[index].numpy().astype(np.float32).reshape(-1, 4),
        gt_labels[index].numpy().astype(np.int64),
        matches.iou[rows].numpy().astype(np.float32),
    )


def fit_box_regressors(
    features: np.ndarray,
    boxes: np.ndarray,
    gt_boxes: np.ndarray,
    labels: np.ndarray,
    iou: np.ndarray,
    num_classes: int,
    lam: float = 1000.0,
    min_iou: float = 0.6,
    scale: float = 1.0,
) -> BoxRegressors:
    """Fit one ridge regressor per class, reading one class's features at a time.

    Args:
        features: (M, F) pool5 features, any array that numpy indexes by rows (a memory-mapped file:
            only one class's rows are ever in memory, as float64).
        boxes: (M, 4) the regions' boxes.
        gt_boxes: (M, 4) each region's best-overlapping ground-truth box.
        labels: (M,) that box's class 1..K.
        iou: (M,) the overlap with it.
        num_classes: K.
        lam: ridge penalty (lambda, 1000 in the original).
        min_iou: examples need IoU above this (0.6).
        scale: what the features are multiplied by (in float32) before the fit.
    """
    f = features.shape[1]
    weight = np.zeros((num_classes, f, 4), np.float32)
    bias = np.zeros((num_classes, 4), np.float32)
    t_inv = np.tile(np.eye(4, dtype=np.float32), (num_classes, 1, 1))
    mu = np.zeros((num_classes, 4), np.float32)
    trained = np.zeros(num_classes, bool)
    examples = []
    for j in range(num_classes):
        rows = np.nonzero((labels == j + 1) & (iou > min_iou))[0]
        examples.append(len(rows))
        if len(rows) < 2:
            continue
        y = encode_deltas(torch.from_numpy(boxes[rows]), torch.from_numpy(gt_boxes[rows])).numpy()
        mu[j] = y.mean(0)
        cov = (y - mu[j]).T @ (y - mu[j]) / len(rows)
        evals, evecs = np.linalg.eigh(cov)
        t = evecs @ np.diag(1.0 / np.sqrt(evals + 1e-3)) @ evecs.T  # whitening
        t_inv[j] = evecs @ np.diag(np.sqrt(evals + 1e-3)) @ evecs.T
        x = np.asarray(features[rows], np.float32) * np.float32(scale)  # (Mj, F)
        ridge = Ridge(alpha=lam).fit(x.astype(np.float64), (y - mu[j]) @ t)
        weight[j] = ridge.coef_.T
        bias[j] = ridge.intercept_
        trained[j] = True
    return BoxRegressors(
        torch.from_numpy(weight),
        torch.from_numpy(bias),
        torch.from_numpy(t_inv),
        torch.from_numpy(mu),
        torch.from_numpy(trained),
        examples,
    )
