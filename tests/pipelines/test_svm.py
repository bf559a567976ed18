from __future__ import annotations

import numpy as np
from rcnn_bench.pipelines.parts.svm import SVMConfig, train_svms


def separable(seed=0, images=12, per_image=300, d=8):
    """Class 1 positives near +e0, class 2 near +e1; negatives spread around -e0 - e1."""
    rng = np.random.default_rng(seed)
    pos1 = rng.normal(0, 0.3, (20, d)) + 4 * np.eye(d)[0]
    pos2 = rng.normal(0, 0.3, (25, d)) + 4 * np.eye(d)[1]
    imgs = []
    for _ in range(images):
        feats = rng.normal(0, 1.5, (per_image, d)) - 1.0
        imgs.append((feats.astype(np.float32), np.ones((per_image, 2), bool)))
    return [pos1.astype(np.float32), pos2.astype(np.float32)], imgs


def test_mining_separates_and_retrains_and_evicts():
    positives, images = separable()
    cfg = SVMConfig(c=1.0, retrain_limit=200)
    w, b, records = train_svms(positives, images, cfg)
    for j, pos in enumerate(positives):
        assert (pos @ w[:, j] + b[j] > 0).all()
        negs = np.concatenate([f for f, _ in images])
        assert (negs @ w[:, j] + b[j] < 0).mean() > 0.99
        r = records[j]
        assert r.positives == len(pos)
        assert r.rounds >= 2  # first image, then at least the final retrain
        assert r.negatives_added >= images[0][0].shape[0]  # the first image's negatives all join
        assert r.cached_negatives == r.cache_sizes[-1] < r.negatives_added  # easy ones were evicted


def test_hard_negative_rule():
    """After the first image, only negatives scoring above -1.0001 join the cache."""
    positives, images = separable(images=2, per_image=200)
    _, _, records = train_svms(positives, images, SVMConfig(c=1.0))
    # The second image adds only margin violators, far fewer than its 200 regions.
    assert records[0].negatives_added - 200 < 100


def test_negative_mask_and_class_without_positives():
    positives, images = separable(images=3)
    positives[1] = positives[1][:0]
    images = [(f, np.stack((m[:, 0], np.zeros(len(m), bool)), 1)) for f, m in images]
    w, b, records = train_svms(positives, images, SVMConfig(c=1.0))
    assert records[1].rounds == 0 and b[1] == -np.inf and (w[:, 1] == 0).all()
    assert records[0].rounds >= 2
