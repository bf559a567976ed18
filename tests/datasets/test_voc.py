from __future__ import annotations

import shutil

import numpy as np
import pytest
from rcnn_bench.datasets.synthetic import SYNTHETIC_CLASSES
from rcnn_bench.datasets.voc import (
    VOC_CLASSES,
    Annotation,
    DatasetError,
    VOCDataset,
    object_names,
    parse_annotation,
    read_image,
    write_annotation,
)

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
    with pytest.raises(DatasetError, match=r"broken\.xml: malformed XML"):
        parse_annotation(path, VOC_CLASSES)


def test_non_numeric_coordinate(tmp_path):
    path = write_xml(tmp_path / "nan.xml", x1="abc")
    with pytest.raises(DatasetError, match=r"<xmin> is 'abc', not a number"):
        parse_annotation(path, VOC_CLASSES)


def test_corrupt_and_missing_images(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"bad\.jpg: image cannot be decoded"):
        read_image(bad)
    with pytest.raises(DatasetError, match=r"gone\.jpg: image file is missing"):
        read_image(tmp_path / "gone.jpg")


def copy_of(tiny_voc, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_voc[0], root)
    return root


def test_empty_split_file(tiny_voc, tmp_path):
    root = copy_of(tiny_voc, tmp_path)
    (root / "ImageSets/Main/test.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"test\.txt: split file lists no images"):
        VOCDataset(root, "test")


def test_missing_split_and_image(tiny_voc, tmp_path):
    root = copy_of(tiny_voc, tmp_path)
    with pytest.raises(DatasetError, match=r"val\.txt: split file for 'val' is missing"):
        VOCDataset(root, "val")
    (root / "JPEGImages/test_00001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"test_00001\.jpg: image file is missing"):
        VOCDataset(root, "test")


def test_corrupt_image_in_dataset_names_file(tiny_voc, tmp_path):
    root = copy_of(tiny_voc, tmp_path)
    (root / "JPEGImages/test_00002.jpg").write_bytes(b"\xff\xd8garbage")
    ds = VOCDataset(root, "test")
    ds.load_image(0)
    with pytest.raises(DatasetError, match=r"test_00002\.jpg: image cannot be decoded"):
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


def test_voc_classes_are_sorted_so_discovery_keeps_their_order():
    # VOC2007's devkit has no classes.txt: discovery sorts the names it finds, which must give VOC's
    # usual numbering (aeroplane = 1 ... tvmonitor = 20).
    assert list(VOC_CLASSES) == sorted(VOC_CLASSES)


def voc_folder(root, objects_per_image):
    """A VOC folder without classes.txt: one image per entry, split "all", objects named as given."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(len(objects_per_image))]
    for image_id, names in zip(ids, objects_per_image, strict=True):
        objects = "".join(
            f"<object><name>{n}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
            "<ymax>5</ymax></bndbox></object>"
            for n in names
        )
        (root / f"Annotations/{image_id}.xml").write_text(
            f"<annotation><size><width>10</width><height>10</height></size>{objects}</annotation>"
        )
        (root / f"JPEGImages/{image_id}.jpg").write_bytes(b"")  # opening checks only that it exists
    (root / "ImageSets/Main/all.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc2007_names_in_any_order_are_discovered_as_voc_classes(tmp_path):
    root = voc_folder(tmp_path / "voc", [[name] for name in reversed(VOC_CLASSES)])
    ds = VOCDataset(root, "all")
    assert ds.classes == VOC_CLASSES
    assert [a.labels.tolist() for a in ds.annotations] == [[k] for k in range(20, 0, -1)]


def without_classes_txt(tiny_voc, tmp_path):
    root = copy_of(tiny_voc, tmp_path)
    (root / "classes.txt").unlink()
    return root


def test_classes_discovered_from_the_whole_split_and_renumbered(tiny_voc, tmp_path):
    root = without_classes_txt(tiny_voc, tmp_path)
    _, written = tiny_voc
    names = {SYNTHETIC_CLASSES[k - 1] for a in written["trainval"] for k in a.labels}
    assert names == set(SYNTHETIC_CLASSES)  # the fixture has every class in trainval
    ds = VOCDataset(root, "trainval")
    assert ds.classes == ("cross", "disc", "square", "triangle")
    for got, want in zip(ds.annotations, written["trainval"], strict=True):
        assert [ds.classes[k - 1] for k in got.labels] == [
            SYNTHETIC_CLASSES[k - 1] for k in want.labels
        ]
    # A limit keeps the classes of the whole split, so a short run numbers classes as a full one.
    first = {SYNTHETIC_CLASSES[k - 1] for k in written["trainval"][0].labels}
    assert len(first) < 4
    assert VOCDataset(root, "trainval", limit=1).classes == ds.classes


def test_test_split_takes_the_training_classes(tiny_voc, tmp_path):
    root = without_classes_txt(tiny_voc, tmp_path)
    (root / "ImageSets/Main/one.txt").write_text("test_00000\n")  # a split with fewer classes
    train = VOCDataset(root, "trainval")
    alone = VOCDataset(root, "one")
    test = VOCDataset(root, "one", classes=train.classes)
    assert len(alone.classes) < 4 and test.classes == train.classes
    names = [alone.classes[k - 1] for k in alone.annotations[0].labels]
    assert [test.classes[k - 1] for k in test.annotations[0].labels] == names


def test_test_class_the_training_split_never_saw(tiny_voc, tmp_path):
    root = without_classes_txt(tiny_voc, tmp_path)
    xml = root / "Annotations/test_00001.xml"
    name = object_names(xml)[0]
    xml.write_text(xml.read_text().replace(f"<name>{name}</name>", "<name>hexagon</name>", 1))
    train = VOCDataset(root, "trainval")
    with pytest.raises(DatasetError) as err:
        VOCDataset(root, "test", classes=train.classes)
    message = str(err.value)
    assert message.startswith(f"{xml}: class 'hexagon' is not among the training split's classes")
    assert "classes.txt" in message and "\n" not in message


def test_classes_txt_wins_and_must_agree_with_given_classes(tiny_voc, tmp_path):
    root = copy_of(tiny_voc, tmp_path)
    assert VOCDataset(root, "test", classes=SYNTHETIC_CLASSES).classes == SYNTHETIC_CLASSES
    with pytest.raises(
        DatasetError, match=r"classes\.txt: lists disc, square, triangle, cross but"
    ):
        VOCDataset(root, "test", classes=sorted(SYNTHETIC_CLASSES))


def test_no_objects_to_discover_classes_from(tmp_path):
    root = voc_folder(tmp_path / "voc", [[], []])
    with pytest.raises(DatasetError, match=r"all\.txt: the split's annotations name no object"):
        VOCDataset(root, "all")


def test_written_xml_reads_back_with_fractions_kept(tmp_path):
    ann = Annotation(
        "a",
        (40, 50),
        np.array([[0, 4, 10, 20], [10.25, 3.5, 20.75, 30]], np.float32),
        np.array([1, 2], np.int64),
        np.array([False, True]),
    )
    path = tmp_path / "Annotations/a.xml"
    path.parent.mkdir()
    write_annotation(path, ann, ("dog", "cat"))
    text = path.read_text()
    assert "<xmin>1</xmin>" in text and "<xmax>10</xmax>" in text  # whole pixels stay integers
    assert "<xmin>11.25</xmin>" in text and "<ymin>4.5</ymin>" in text
    got = parse_annotation(path, ("dog", "cat"))
    np.testing.assert_array_equal(got.boxes, ann.boxes)
    assert got.labels.tolist() == [1, 2] and got.difficult.tolist() == [False, True]
    assert got.size == (40, 50)
