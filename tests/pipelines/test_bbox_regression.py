from __future__ import annotations

import numpy as np
import torch
from torch.testing import assert_close

from pipelines.bbox_regression import fit_box_regressors
from pipelines.boxes import box_iou, decode_deltas


def matched_iou(a, b):
    return box_iou(a, b).diagonal()


def test_ridge_learns_a_linear_shift():
    """Features that encode the true deltas linearly: regressed boxes land on the ground truth."""
    rng = np.random.default_rng(0)
    m = 400
    gt = np.tile(np.array([[20.0, 20, 60, 80]], np.float32), (m, 1))
    deltas = rng.normal(0, 0.1, (m, 4)).astype(np.float32)
    boxes = decode_deltas(torch.from_numpy(gt), torch.from_numpy(-deltas)).numpy()  # near the gt
    feats = np.concatenate((deltas, rng.normal(0, 0.01, (m, 6))), 1).astype(np.float32) * 10
    iou = matched_iou(torch.from_numpy(boxes), torch.from_numpy(gt)).numpy()
    labels = np.full(m, 2)
    reg = fit_box_regressors(feats, boxes, gt, labels, iou, num_classes=3, lam=1e-3, min_iou=0.0)
    assert reg.trained.tolist() == [False, True, False] and reg.examples[1] == m
    moved = reg.predict(torch.from_numpy(feats), torch.from_numpy(boxes), torch.full((m,), 1))
    before = matched_iou(torch.from_numpy(boxes), torch.from_numpy(gt)).mean()
    after = matched_iou(moved, torch.from_numpy(gt)).mean()
    assert after > 0.97 and after > before
    # An untrained class leaves its boxes where they are.
    same = reg.predict(
        torch.from_numpy(feats[:5]), torch.from_numpy(boxes[:5]), torch.zeros(5, dtype=torch.long)
    )
    assert_close(same, torch.from_numpy(boxes[:5]))
