from __future__ import annotations

import shutil

import numpy as np
import pytest

from datasets.voc import VOC_CLASSES, DatasetError, VOCDataset, parse_annotation, read_image

XML = """<annotation><size><width>100</width><height>80</height><depth>3</depth></size>
<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>
</annotation>"""


def write_xml(path, name="dog", difficult=0, x1=1, y1=1, x2=10, y2=20):
    path.write_text(XML.format(name=name, difficult=difficult, x1=x1, y1=y1, x2=x2, y2=y2))
    return path


def test_one_based_inclusive_coordinates_become_zero_based_xyxy(tmp_path):
    ann = parse_annotation(write_xml(tmp_path / "a.xml", x1=1, y1=5, x2=10, y2=20), VOC_CLASSES)
    np.testing.assert_array_equal(ann.boxes, [[0, 4, 10, 20]])  # 10 pixels wide, 16 tall
    assert ann.labels.tolist() == [VOC_CLASSES.index("dog") + 1]
    assert ann.size == (80, 100)
    assert ann.difficult.tolist() == [False]


def test_difficult_flag(tmp_path):
    ann = parse_annotation(write_xml(tmp_path / "a.xml", difficult=1), VOC_CLASSES)
    assert ann.difficult.tolist() == [True]


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"name": "unicorn"}, "unknown class 'unicorn'"),
        ({"x1": 50, "x2": 40}, "has no area"),
        ({"x2": 101}, "outside the 100x80 image"),
        ({"y1": 0}, "outside the 100x80 image"),
    ],
)
def test_bad_boxes_and_classes_name_the_file(tmp_path, kwargs, problem):
    path = write_xml(tmp_path / "bad.xml", **kwargs)
    with pytest.raises(DatasetError) as err:
        parse_annotation(path, VOC_CLASSES)
    assert str(path) in str(err.value) and problem in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_xml(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<annotation><size>")
    with pytest.raises(DatasetError, match="broken.xml: malformed XML"):
        parse_annotation(path, VOC_CLASSES)


def test_non_numeric_coordinate(tmp_path):
    path = write_xml(tmp_path / "nan.xml", x1="abc")
    with pytest.raises(DatasetError, match="<xmin> is 'abc', not a number"):
        parse_annotation(path, VOC_CLASSES)


def test_corrupt_and_missing_images(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match="bad.jpg: image cannot be decoded"):
        read_image(bad)
    with pytest.raises(DatasetError, match="gone.jpg: image file is missing"):
        read_image(tmp_path / "gone.jpg")


def copy_of(tiny_voc, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_voc[0], root)
    return root


def test_empty_split_file(tiny_voc, tmp_path):
    root = copy_of(tiny_voc, tmp_path)
    (root / "ImageSets/Main/test.txt").write_text("\n")
    with pytest.raises(DatasetError, match="test.txt: split file lists no images"):
        VOCDataset(root, "test")


def test_missing_split_and_image(tiny_voc, tmp_path):
    root = copy_of(tiny_voc, tmp_path)
    with pytest.raises(DatasetError, match="val.txt: split file for 'val' is missing"):
        VOCDataset(root, "val")
    (root / "JPEGImages/test_00001.jpg").unlink()
    with pytest.raises(DatasetError, match="test_00001.jpg: image file is missing"):
        VOCDataset(root, "test")


def test_corrupt_image_in_dataset_names_file(tiny_voc, tmp_path):
    root = copy_of(tiny_voc, tmp_path)
    (root / "JPEGImages/test_00002.jpg").write_bytes(b"\xff\xd8garbage")
    ds = VOCDataset(root, "test")
    ds.load_image(0)
    with pytest.raises(DatasetError, match="test_00002.jpg: image cannot be decoded"):
        ds.load_image(2)


def test_fingerprint_follows_annotations(tiny_voc, tmp_path):
    root = copy_of(tiny_voc, tmp_path)
    before = VOCDataset(root, "test").fingerprint
    assert VOCDataset(root, "test").fingerprint == before
    xml = root / "Annotations/test_00000.xml"
    xml.write_text(
        xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1)
    )
    assert VOCDataset(root, "test").fingerprint != before
