from __future__ import annotations

import numpy as np
import torch
from rcnn_bench.pipelines.parts.bbox_regression import BoxRegressors, fit_box_regressors
from rcnn_bench.pipelines.parts.boxes import box_iou, decode_deltas
from torch.testing import assert_close


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


def test_memory_mapped_features_fit_as_in_memory(tmp_path):
    """Regressors fitted from a float16 file read class by class equal those fitted from the same
    features scaled in memory."""
    rng = np.random.default_rng(1)
    m = 60
    gt = rng.uniform(20, 40, (m, 4)).astype(np.float32)
    gt[:, 2:] += 30
    boxes = gt + rng.normal(0, 2, (m, 4)).astype(np.float32)
    labels = rng.integers(1, 4, m)
    iou = matched_iou(torch.from_numpy(boxes), torch.from_numpy(gt)).numpy()
    feats = np.lib.format.open_memmap(tmp_path / "pool5.npy", "w+", np.float16, (m, 16))
    feats[:] = rng.normal(0, 1, (m, 16))
    feats.flush()
    mapped = np.load(tmp_path / "pool5.npy", mmap_mode="r")
    scale = 3.7
    in_memory = np.asarray(mapped, np.float32) * np.float32(scale)
    args = (boxes, gt, labels, iou, 3)
    got = fit_box_regressors(mapped, *args, lam=10.0, min_iou=0.5, scale=scale)
    want = fit_box_regressors(in_memory, *args, lam=10.0, min_iou=0.5)
    assert got.examples == want.examples and sum(got.examples) > 10
    for name in ("weight", "bias", "t_inv", "mu", "trained"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_predict_equals_a_loop_over_the_rows_classes():
    """One product for every class, each row keeping its class's deltas, against the plain loop:
    each class's rows through its own map; an untrained class's rows unmoved."""
    gen = torch.Generator().manual_seed(2)
    k, f, m = 4, 12, 30
    reg = BoxRegressors(
        weight=torch.randn(k, f, 4, generator=gen) * 0.01,
        bias=torch.randn(k, 4, generator=gen) * 0.01,
        t_inv=torch.eye(4) + 0.1 * torch.randn(k, 4, 4, generator=gen),
        mu=torch.randn(k, 4, generator=gen) * 0.01,
        trained=torch.tensor([True, False, True, True]),
        examples=[5, 0, 5, 5],
    )
    features = torch.randn(m, f, generator=gen)
    boxes = torch.rand(m, 4, generator=gen) * 50
    boxes[:, 2:] += boxes[:, :2] + 10
    cls = torch.randint(0, k, (m,), generator=gen)
    expected = boxes.clone()
    for j in range(k):
        rows = torch.nonzero(cls == j).flatten()
        if not reg.trained[j] or len(rows) == 0:
            continue
        deltas = (features[rows] @ reg.weight[j] + reg.bias[j]) @ reg.t_inv[j] + reg.mu[j]
        expected[rows] = decode_deltas(boxes[rows], deltas)
    assert_close(reg.predict(features, boxes, cls), expected)
    assert torch.equal(reg.predict(features, boxes, cls)[cls == 1], boxes[cls == 1])
    empty = reg.predict(features[:0], boxes[:0], cls[:0])
    assert empty.shape == (0, 4)
