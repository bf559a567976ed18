from __future__ import annotations

import numpy as np
from rcnn_bench.datasets.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, generate
from rcnn_bench.datasets.voc import VOCDataset


def test_folder_loads_back_exactly(tiny_voc):
    root, written = tiny_voc
    for split, anns in written.items():
        ds = VOCDataset(root, split)
        assert ds.classes == SYNTHETIC_CLASSES
        assert ds.image_ids == [a.image_id for a in anns]
        for got, want in zip(ds.annotations, anns, strict=True):
            np.testing.assert_array_equal(got.boxes, want.boxes)
            np.testing.assert_array_equal(got.labels, want.labels)
            np.testing.assert_array_equal(got.difficult, want.difficult)
            assert got.size == want.size
        image = ds.load_image(0)
        assert image.dtype == np.uint8 and image.shape == (*anns[0].size, 3)


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    cfg = SyntheticConfig(
        seed=5, train_images=2, test_images=1, min_size=(48, 48), max_size=(64, 64)
    )
    a = generate(tmp_path / "a", cfg)
    b = generate(tmp_path / "b", cfg)
    c = generate(tmp_path / "c", SyntheticConfig(**{**cfg.__dict__, "seed": 6}))
    for x, y in zip(a["trainval"], b["trainval"], strict=True):
        np.testing.assert_array_equal(x.boxes, y.boxes)
    assert (tmp_path / "a/JPEGImages/trainval_00000.jpg").read_bytes() == (
        tmp_path / "b/JPEGImages/trainval_00000.jpg"
    ).read_bytes()
    assert any(
        x.boxes.shape != z.boxes.shape or not np.array_equal(x.boxes, z.boxes)
        for x, z in zip(a["trainval"], c["trainval"], strict=True)
    )


def test_variety_difficult_and_boxes_inside(tmp_path):
    written = generate(tmp_path / "v", SyntheticConfig(seed=1, train_images=40, test_images=0))
    anns = written["trainval"]
    labels = np.concatenate([a.labels for a in anns])
    assert set(labels.tolist()) == {1, 2, 3, 4}
    assert max(len(a.labels) for a in anns) >= 3  # several objects per image
    difficult = np.concatenate([a.difficult for a in anns])
    assert 0 < difficult.sum() < len(difficult)
    for a in anns:
        h, w = a.size
        assert (
            (a.boxes[:, :2] >= 0).all()
            and (a.boxes[:, 2] <= w).all()
            and (a.boxes[:, 3] <= h).all()
        )
        assert ((a.boxes[:, 2:] - a.boxes[:, :2]) > 0).all()
    sides = np.concatenate([a.boxes[:, 2:] - a.boxes[:, :2] for a in anns])
    assert sides.min() < 20 and sides.max() > 60  # varied size
