from __future__ import annotations

import shutil
from unittest import mock

import numpy as np
import pytest

from datasets.voc import VOCDataset
from pipelines import proposals as P
from pipelines.proposals import (
    ProposalCacheError,
    ProposalConfig,
    load_or_compute,
    selective_search,
)

CFG = ProposalConfig(resize_max_side=64, max_proposals=50, min_side=3)


def test_selective_search_boxes_follow_the_rules(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "test")
    image = ds.load_image(0)
    boxes = selective_search(image, CFG)
    h, w = image.shape[:2]
    assert 0 < len(boxes) <= 50 and boxes.dtype == np.float32
    assert (boxes[:, 2:] - boxes[:, :2] >= 3).all()
    assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    # Boxes are in original pixels although segmentation ran on a shrunk image (64 < 80..96).
    assert boxes[:, 2].max() > 64 or boxes[:, 3].max() > 64
    quality = selective_search(
        image, ProposalConfig(mode="quality", resize_max_side=64, max_proposals=2000)
    )
    assert len(quality) > len(selective_search(image, ProposalConfig(resize_max_side=64)))


def test_computed_once_then_read_from_cache(tiny_voc, tmp_path):
    ds = VOCDataset(tiny_voc[0], "trainval")
    first, cached = load_or_compute(ds, CFG, tmp_path, workers=2)
    assert not cached and first.image_ids == ds.image_ids
    with mock.patch.object(P, "compute", side_effect=AssertionError("recomputed")):
        second, cached = load_or_compute(ds, CFG, tmp_path, workers=1)
    assert cached
    for a, b in zip(first.boxes, second.boxes, strict=True):
        np.testing.assert_array_equal(a, b)
    stats = second.stats(ds)
    assert stats["mean_per_image"] > 0 and 0 < stats["recall_iou50"] <= 1
    assert stats["recall_iou70"] <= stats["recall_iou50"]
    # Other parameters are another cache entry.
    assert P.cache_path(tmp_path, ds, CFG) != P.cache_path(tmp_path, ds, ProposalConfig())


def test_cache_of_another_split_is_refused(tiny_voc, tmp_path):
    train, test = VOCDataset(tiny_voc[0], "trainval"), VOCDataset(tiny_voc[0], "test")
    load_or_compute(test, CFG, tmp_path, workers=1)
    shutil.copy(P.cache_path(tmp_path, test, CFG), P.cache_path(tmp_path, train, CFG))
    with pytest.raises(ProposalCacheError, match="computed for split 'test'.*image ids differ"):
        load_or_compute(train, CFG, tmp_path)


def test_corrupt_cache_is_refused(tiny_voc, tmp_path):
    ds = VOCDataset(tiny_voc[0], "test")
    path = P.cache_path(tmp_path, ds, CFG)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"junk")
    with pytest.raises(ProposalCacheError, match="unreadable proposal cache"):
        load_or_compute(ds, CFG, tmp_path)


def test_bad_mode():
    with pytest.raises(ValueError, match="proposals.mode"):
        ProposalConfig(mode="slow")
