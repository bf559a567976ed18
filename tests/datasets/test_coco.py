from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from rcnn_bench.datasets.coco import COCODataset, coco_json, load_coco
from rcnn_bench.datasets.voc import Annotation, DatasetError


def write_image(path, height, width):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 128, np.uint8))


def coco_split(tmp_path, name="train.json", images=None, annotations=None, categories=None):
    """A COCO json (and its images under tmp_path/img): by default two images, two categories."""
    images = images or [
        {"id": 9, "file_name": "b.jpg", "width": 50, "height": 20},
        {"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
    ]
    annotations = annotations or [
        {"id": 1, "image_id": 7, "category_id": 18, "bbox": [2, 3, 10, 5], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        {"id": 3, "image_id": 9, "category_id": 3, "bbox": [10.5, 2.25, 4, 6], "iscrowd": 0},
    ]
    categories = categories or [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]
    for image in images:
        write_image(tmp_path / "img" / image["file_name"], image.get("height", 8), image["width"])
    path = tmp_path / name
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return tmp_path / "img", path


def test_boxes_labels_crowd_sizes_and_ids(tmp_path):
    images_dir, path = coco_split(tmp_path)
    ds = COCODataset(images_dir, path, "train")
    # Labels follow increasing category id: car (3) is 1, dog (18) is 2.
    assert ds.classes == ("car", "dog") and ds.category_ids == (3, 18) and ds.num_classes == 2
    assert ds.image_ids == ["9", "7"] and len(ds) == 2  # the file's order
    b, a = ds.annotations
    assert (b.image_id, b.size, a.image_id, a.size) == ("9", (20, 50), "7", (30, 40))
    # [x, y, w, h] -> xyxy (x, y, x + w, y + h)
    np.testing.assert_array_equal(b.boxes, [[10.5, 2.25, 14.5, 8.25]])
    np.testing.assert_array_equal(a.boxes, [[2, 3, 12, 8], [0, 0, 40, 30]])
    assert a.labels.tolist() == [2, 1] and b.labels.tolist() == [1]
    assert a.difficult.tolist() == [False, True]  # the crowd object
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert ds.image_path("7") == images_dir / "a.jpg"
    assert ds.load_image(1).shape == (30, 40, 3)
    assert ds.name == tmp_path.name and ds.split == "train" and ds.root == images_dir


def test_areas_are_the_files_own_else_w_times_h(tmp_path):
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 3, 10, 5], "area": 31.5},
        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 4, 6]},  # no area: w * h
    ]
    images_dir, path = coco_split(tmp_path, annotations=annotations)
    ds = COCODataset(images_dir, path, "train")
    assert ds.annotations[1].coco_areas.tolist() == [31.5, 24.0]
    assert [o["area"] for o in coco_json(ds.annotations, ds.classes)["annotations"]] == [31.5, 24.0]


def test_name_skips_an_annotations_folder(tmp_path):
    images_dir, path = coco_split(tmp_path)
    (tmp_path / "annotations").mkdir()
    moved = path.rename(tmp_path / "annotations" / "instances_val.json")
    assert COCODataset(images_dir, moved, "val").name == tmp_path.name


def test_limit_keeps_the_first_images(tmp_path):
    images_dir, path = coco_split(tmp_path)
    ds = COCODataset(images_dir, path, "train", limit=1)
    assert ds.image_ids == ["9"] and ds.classes == ("car", "dog")


def test_test_split_takes_the_training_labels_by_name(tmp_path):
    images_dir, path = coco_split(tmp_path)
    train = COCODataset(images_dir, path, "train")
    _, test_path = coco_split(
        tmp_path,
        "test.json",
        images=[{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        annotations=[
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [2, 2, 5, 5]},
        ],
        categories=[{"id": 2, "name": "dog"}, {"id": 5, "name": "car"}],
    )
    alone = COCODataset(images_dir, test_path, "test")
    assert alone.classes == ("dog", "car") and alone.annotations[0].labels.tolist() == [2, 1]
    test = COCODataset(images_dir, test_path, "test", classes=train.classes)
    assert test.classes == ("car", "dog") and test.category_ids == (5, 2)
    assert test.annotations[0].labels.tolist() == [1, 2]


def test_test_category_the_training_split_never_saw(tmp_path):
    images_dir, _ = coco_split(tmp_path)
    _, test_path = coco_split(
        tmp_path,
        "test.json",
        images=[{"id": 4, "file_name": "a.jpg", "width": 40, "height": 30}],
        annotations=[{"id": 1, "image_id": 4, "category_id": 24, "bbox": [1, 1, 5, 5]}],
        categories=[{"id": 24, "name": "zebra"}, {"id": 3, "name": "car"}],
    )
    with pytest.raises(DatasetError) as err:
        COCODataset(images_dir, test_path, "test", classes=("car", "dog"))
    assert str(err.value) == (
        f"{test_path}: category 'zebra' (id 24, image id 4) never appears in the training split, "
        "whose classes are car, dog; train on a split that has it or leave it out of the test file"
    )


def bad(tmp_path, image=None, ann=None, categories=None):
    image = image or {"id": 5, "file_name": "a.jpg", "width": 40, "height": 30}
    ann = ann or {"id": 8, "image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5]}
    return coco_split(tmp_path, "bad.json", [image], [ann], categories or [{"id": 1, "name": "c"}])


@pytest.mark.parametrize(
    "ann, problem",
    [
        (
            {"bbox": [30, 1, 11, 5]},
            "box [x, y, w, h] = [30, 1, 11, 5] of annotation 8 of image id 5 "
            "lies outside the 40x30 image; fix the box or the image size",
        ),
        (
            {"bbox": [-0.5, 1, 5, 5]},
            "box [x, y, w, h] = [-0.5, 1, 5, 5] of annotation 8 of image id 5 "
            "lies outside the 40x30 image; fix the box or the image size",
        ),
        (
            {"bbox": [1, 1, 0, 5]},
            "box [x, y, w, h] = [1, 1, 0, 5] of annotation 8 of image id 5 has "
            "no area; fix or remove the annotation",
        ),
        ({"bbox": [1, 1, 5]}, "annotation 8 of image id 5 has no [x, y, w, h] bbox of numbers"),
        (
            {"bbox": [1, "1", 5, 5]},
            "annotation 8 of image id 5 has no [x, y, w, h] bbox of numbers",
        ),
        (
            {"category_id": 2},
            "annotation 8 of image id 5 has category_id 2, which is not among the "
            "file's categories; add the category or fix the annotation",
        ),
    ],
)
def test_bad_annotations_are_one_line_naming_file_and_id(tmp_path, ann, problem):
    images_dir, path = bad(tmp_path, ann={"id": 8, "image_id": 5, "category_id": 1, **ann})
    with pytest.raises(DatasetError) as err:
        COCODataset(images_dir, path, "bad")
    assert str(err.value) == f"{path}: {problem}"


def test_missing_image_file_names_it_and_the_id(tmp_path):
    images_dir, path = bad(tmp_path)
    (images_dir / "a.jpg").unlink()
    with pytest.raises(DatasetError) as err:
        COCODataset(images_dir, path, "bad")
    assert str(err.value) == (
        f"{images_dir / 'a.jpg'}: image file of image id 5 is missing; file names are relative "
        f"to {images_dir}"
    )


def test_no_images_and_no_size(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DatasetError) as err:
        COCODataset(tmp_path, path, "empty")
    assert str(err.value) == f"{path}: split 'empty' lists no images; is this its annotation file?"
    images_dir, path = bad(tmp_path, image={"id": 5, "file_name": "a.jpg", "width": 40})
    with pytest.raises(
        DatasetError, match=r"bad\.json: image id 5 has no positive width and height"
    ):
        COCODataset(images_dir, path, "bad")


@pytest.mark.parametrize(
    "text, problem",
    [
        (None, "annotation file is missing"),
        ("{not json", "not a COCO annotation file (Expecting property name"),
        (
            "[1, 2]",
            "not a COCO annotation file (annotation file format <class 'list'> not supported)",
        ),
        ('{"images": []}', "not a COCO annotation file (no 'annotations' list)"),
        ('{"images": [{"file_name": "a.jpg"}]}', "not a COCO annotation file ('id')"),
    ],
)
def test_unreadable_annotation_file_is_one_line(tmp_path, capsys, text, problem):
    path = tmp_path / "x.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DatasetError) as err:
        load_coco(path)
    assert str(err.value).startswith(f"{path}: {problem}") and "\n" not in str(err.value)
    assert capsys.readouterr().out == ""  # COCO's progress prints are silenced


def test_load_prints_nothing(tmp_path, capsys):
    _, path = coco_split(tmp_path)
    assert len(load_coco(path).imgs) == 2
    assert capsys.readouterr().out == ""


def test_size_mismatch_on_load(tmp_path):
    images_dir, path = coco_split(tmp_path)
    write_image(images_dir / "a.jpg", 31, 40)
    ds = COCODataset(images_dir, path, "train")
    with pytest.raises(DatasetError) as err:
        ds.load_image(1)
    assert (
        str(err.value) == f"{images_dir / 'a.jpg'}: image id 7 is 40x31 but train.json says 40x30"
    )


def test_fingerprint_follows_boxes(tmp_path):
    images_dir, path = coco_split(tmp_path)
    before = COCODataset(images_dir, path, "train").fingerprint
    assert COCODataset(images_dir, path, "train").fingerprint == before
    path.write_text(path.read_text().replace("[2, 3, 10, 5]", "[2, 3, 10, 6]"))
    assert COCODataset(images_dir, path, "train").fingerprint != before


def test_coco_json_writes_xywh_crowd_and_nonzero_ids():
    ann = Annotation(
        "img",
        (30, 40),
        np.array([[2, 3, 12, 8], [0.5, 0, 40, 30]], np.float32),
        np.array([2, 1], np.int64),
        np.array([False, True]),
    )
    data = coco_json([ann], ("car", "dog"), image_ids=[7])
    assert data["images"] == [{"id": 7, "file_name": "img.jpg", "height": 30, "width": 40}]
    assert data["annotations"] == [
        {"id": 1, "image_id": 7, "category_id": 2, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0},
        {
            "id": 2,
            "image_id": 7,
            "category_id": 1,
            "bbox": [0.5, 0, 39.5, 30],
            "area": 1185,
            "iscrowd": 1,
        },
    ]
    assert [c["name"] for c in data["categories"]] == ["car", "dog"]
    assert [c["id"] for c in data["categories"]] == [1, 2]
