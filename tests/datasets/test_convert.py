from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from rcnn_bench.datasets.coco import COCODataset
from rcnn_bench.datasets.convert import coco_to_voc, voc_split_names, voc_to_coco
from rcnn_bench.datasets.synthetic import SYNTHETIC_CLASSES
from rcnn_bench.datasets.voc import DatasetError, VOCDataset

from tests.datasets.test_coco import coco_split


def assert_same_annotations(a, b):
    """Two datasets hold the same classes, and per image the same boxes, labels, flags and size."""
    assert a.classes == b.classes and len(a) == len(b)
    for x, y in zip(a.annotations, b.annotations, strict=True):
        np.testing.assert_array_equal(x.boxes, y.boxes)
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_array_equal(x.difficult, y.difficult)
        assert x.size == y.size


def test_voc_to_coco_round_trip(tiny_voc, tmp_path):
    root, written = tiny_voc
    jsons = voc_to_coco(root, tmp_path / "coco")
    assert sorted(jsons) == ["test", "trainval"]
    for split, path in jsons.items():
        voc = VOCDataset(root, split)
        coco = COCODataset(tmp_path / "coco" / "images", path, split)
        assert coco.classes == SYNTHETIC_CLASSES
        assert_same_annotations(voc, coco)
        assert sum(a.difficult.sum() for a in coco.annotations) == sum(
            a.difficult.sum() for a in written[split]
        )
        np.testing.assert_array_equal(coco.load_image(0), voc.load_image(0))
    # One image, one COCO id, whichever split lists it: ids are ranks among all the folder's ids.
    ids = {
        image["file_name"]: image["id"]
        for path in jsons.values()
        for image in json.loads(path.read_text())["images"]
    }
    assert ids["test_00000.jpg"] == 1 and ids["trainval_00000.jpg"] == 5


def test_voc_to_coco_without_classes_txt_sorts_the_union(tiny_voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc[0], root)
    (root / "classes.txt").unlink()
    (root / "ImageSets/Main/one.txt").write_text("test_00000\n")  # a split with fewer classes
    jsons = voc_to_coco(root, tmp_path / "coco")
    one = COCODataset(tmp_path / "coco" / "images", jsons["one"], "one")
    assert one.classes == ("cross", "disc", "square", "triangle")
    assert_same_annotations(one, VOCDataset(root, "one", classes=one.classes))


def test_per_class_files_are_not_splits(tiny_voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(tiny_voc[0], root)
    (root / "ImageSets/Main/disc_test.txt").write_text("test_00000 -1\ntest_00001  1\n")
    assert voc_split_names(root) == ["test", "trainval"]


def test_coco_to_voc_keeps_fractions_crowds_and_one_class_list(tmp_path):
    images_dir, train_json = coco_split(tmp_path)
    _, test_json = coco_split(
        tmp_path,
        "test.json",
        images=[{"id": 1, "file_name": "c.jpg", "width": 40, "height": 30}],
        annotations=[{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 1.5, 5, 5]}],
        categories=[{"id": 5, "name": "dog"}],
    )
    out = coco_to_voc(images_dir, {"train": train_json, "test": test_json}, tmp_path / "voc")
    assert (out / "classes.txt").read_text() == "car\ndog\n"
    assert (out / "ImageSets/Main/train.txt").read_text() == "b\na\n"
    xml = (out / "Annotations/b.xml").read_text()
    # [10.5, 2.25, 4, 6] is xyxy (10.5, 2.25, 14.5, 8.25): VOC's xmin = x1 + 1, xmax = x2.
    assert "<xmin>11.5</xmin>" in xml and "<ymin>3.25</ymin>" in xml
    assert "<xmax>14.5</xmax>" in xml and "<ymax>8.25</ymax>" in xml
    train = COCODataset(images_dir, train_json, "train")
    assert_same_annotations(VOCDataset(out, "train"), train)
    assert VOCDataset(out, "train").annotations[1].difficult.tolist() == [False, True]
    test = COCODataset(images_dir, test_json, "test", classes=train.classes)
    assert_same_annotations(VOCDataset(out, "test"), test)
    assert VOCDataset(out, "test").annotations[0].labels.tolist() == [2]  # dog, as in train


def test_voc_to_coco_to_voc_is_the_same_folder(tiny_voc, tmp_path):
    root, _ = tiny_voc
    jsons = voc_to_coco(root, tmp_path / "coco")
    back = coco_to_voc(tmp_path / "coco" / "images", jsons, tmp_path / "back")
    for split in jsons:
        a, b = VOCDataset(root, split), VOCDataset(back, split)
        assert a.image_ids == b.image_ids
        assert_same_annotations(a, b)
        for image_id in a.image_ids:
            assert a.image_path(image_id).read_bytes() == b.image_path(image_id).read_bytes()


def test_coco_to_voc_refuses_non_jpeg_and_clashing_stems(tmp_path):
    images_dir, path = coco_split(
        tmp_path,
        images=[{"id": 1, "file_name": "x.png", "width": 8, "height": 8}],
        annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}],
        categories=[{"id": 1, "name": "c"}],
    )
    with pytest.raises(DatasetError) as err:
        coco_to_voc(images_dir, {"train": path}, tmp_path / "voc")
    assert str(err.value) == (
        f"{images_dir / 'x.png'}: image id 1 is not a .jpg; VOC folders hold JPEG files, convert "
        "it first"
    )
    images_dir, path = coco_split(
        tmp_path,
        "two.json",
        images=[
            {"id": 1, "file_name": "p/x.jpg", "width": 8, "height": 8},
            {"id": 2, "file_name": "q/x.jpg", "width": 8, "height": 8},
        ],
        annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}],
        categories=[{"id": 1, "name": "c"}],
    )
    with pytest.raises(DatasetError, match=r"q/x\.jpg: image id 2 has the file name stem of .*p/x"):
        coco_to_voc(images_dir, {"train": path}, tmp_path / "voc")


def test_images_are_copied_where_hard_links_fail(tiny_voc, tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr("rcnn_bench.datasets.convert.os.link", no_links)
    voc_to_coco(tiny_voc[0], tmp_path / "coco")
    src = tiny_voc[0] / "JPEGImages/test_00000.jpg"
    dst = tmp_path / "coco/images/test_00000.jpg"
    assert dst.read_bytes() == src.read_bytes() and not dst.samefile(src)
