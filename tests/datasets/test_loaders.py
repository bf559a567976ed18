from __future__ import annotations

import shutil

import pytest
from rcnn_bench.datasets.coco import COCODataset
from rcnn_bench.datasets.convert import voc_to_coco
from rcnn_bench.datasets.loaders import open_splits
from rcnn_bench.datasets.voc import DatasetError, VOCDataset


def test_voc_test_split_takes_the_training_classes(tiny_voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc[0], root)
    (root / "classes.txt").unlink()
    (root / "ImageSets/Main/one.txt").write_text("test_00000\n")
    train, test = open_splits("voc", root, "trainval", "one", 2, None)
    assert isinstance(test, VOCDataset) and len(train) == 2 and len(test) == 1
    assert test.classes == train.classes == ("cross", "disc", "square", "triangle")
    assert len(VOCDataset(root, "one").classes) < 4  # alone it would number fewer classes


def test_coco_paths_relative_to_root_and_images_pair(tiny_voc, tmp_path):
    voc_to_coco(tiny_voc[0], tmp_path / "coco")
    train, test = open_splits(
        "coco", tmp_path / "coco", "trainval.json", "test.json", None, 3, images="images"
    )
    assert isinstance(train, COCODataset) and (train.split, test.split) == ("trainval", "test")
    assert len(train) == 6 and len(test) == 3 and test.classes == train.classes
    shutil.copytree(tmp_path / "coco/images", tmp_path / "coco/test_images")
    (tmp_path / "coco/images/test_00000.jpg").unlink()
    _, test = open_splits(
        "coco", tmp_path / "coco", "trainval.json", "test.json", images=("images", "test_images")
    )
    assert test.image_path(test.image_ids[0]) == tmp_path / "coco/test_images/test_00000.jpg"
    with pytest.raises(DatasetError, match=r"test_00000\.jpg: image file of image id 1 is missing"):
        open_splits("coco", tmp_path / "coco", "trainval.json", "test.json", images="images")


def test_bad_kind_and_images_for_voc(tiny_voc):
    with pytest.raises(ValueError, match="dataset kind 'yolo' is not one of voc, coco"):
        open_splits("yolo", tiny_voc[0], "trainval", "test")
    with pytest.raises(ValueError, match="images is for kind 'coco'"):
        open_splits("voc", tiny_voc[0], "trainval", "test", images="x")
