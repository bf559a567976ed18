"""COCO-format reader: one annotation json per split and a folder of images.

Read through pycocotools' COCO index. COCO boxes are [x, y, w, h] in continuous 0-based pixels, so
xyxy is (x, y, x + w, y + h); this is the only place that conversion happens. Crowd objects
(iscrowd = 1) become difficult ones: neither side of an evaluation counts them, as VOC's difficult.

Category ids become labels 1..K in increasing id order, with the category names as ``classes``. A
test split opened with the training split's ``classes`` maps its categories to those labels by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from rcnn_bench.datasets.voc import Annotation, DatasetError, read_image

__all__ = ["COCODataset", "coco_json", "load_coco"]


def load_coco(path: str | Path) -> COCO:
    """pycocotools' index of one annotation json, without its progress prints.

    Raises:
        DatasetError: the file is missing, is not json, or is not a COCO annotation file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "annotation file is missing")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except (ValueError, AssertionError, KeyError, TypeError) as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetError(path, f"not a COCO annotation file ({problem})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.dataset.get(key), list):
            raise DatasetError(path, f"not a COCO annotation file (no {key!r} list)")
    return coco


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def coco_json(
    annotations: list[Annotation], classes: tuple[str, ...], image_ids: list[int] | None = None
) -> dict:
    """Annotations as a COCO annotation dict (what an annotation json holds).

    Args:
        annotations: one per image, labels 1..K.
        classes: the K class names; category ids are the labels.
        image_ids: the COCO id of each image (default 1..N); file_name is "<image_id>.jpg" of the
            annotation's own id.

    Returns:
        {"images", "annotations", "categories"}: bbox [x, y, w, h], area the annotation's
        ``coco_areas`` (a COCO file's own, else w * h), iscrowd 1 for a difficult object,
        annotation ids 1, 2, ... (COCOeval needs them non-zero).
    """
    image_ids = image_ids or list(range(1, len(annotations) + 1))
    images, objects = [], []
    for number, ann in zip(image_ids, annotations, strict=True):
        images.append(
            {
                "id": number,
                "file_name": f"{ann.image_id}.jpg",
                "height": ann.size[0],
                "width": ann.size[1],
            }
        )
        for box, label, difficult, area in zip(
            ann.boxes.tolist(), ann.labels, ann.difficult, ann.coco_areas.tolist(), strict=True
        ):
            w, h = box[2] - box[0], box[3] - box[1]
            objects.append(
                {
                    "id": len(objects) + 1,
                    "image_id": number,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], w, h],
                    "area": area,
                    "iscrowd": int(difficult),
                }
            )
    categories = [
        {"id": k + 1, "name": name, "supercategory": "none"} for k, name in enumerate(classes)
    ]
    return {"images": images, "annotations": objects, "categories": categories}


class COCODataset:
    """One split in COCO format, with VOCDataset's interface. Checked when it is opened.

    Args:
        images_dir: the folder that the images' file_name entries are relative to.
        ann_file: the split's annotation json.
        split_name: the split's name in cache keys and reports ("train2017", "test").
        limit: keep only the first ``limit`` images, in the file's order (None keeps all).
        classes: the training split's class names, for a test split: its categories then get the
            training split's labels (matched by name). None numbers this file's own categories.

    Attributes:
        image_ids: str(COCO image id) of each image, in the file's order.
        category_ids: label - 1 -> this file's category id (None where the file does not declare
            one of the given ``classes``).
    """

    def __init__(
        self,
        images_dir: str | Path,
        ann_file: str | Path,
        split_name: str,
        limit: int | None = None,
        classes: tuple[str, ...] | list[str] | None = None,
    ):
        self.root = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.split = split_name
        coco = load_coco(self.ann_file)
        images = list(coco.imgs.values())
        if not images:
            raise DatasetError(
                self.ann_file, f"split {split_name!r} lists no images; is this its annotation file?"
            )
        images = images[:limit] if limit else images
        objects = [coco.imgToAnns[image["id"]] for image in images]
        self.classes, self.category_ids = self._categories(coco.cats, objects, classes)
        labels = {cat: k + 1 for k, cat in enumerate(self.category_ids) if cat is not None}
        self.image_ids = [str(image["id"]) for image in images]
        self._files = {str(image["id"]): str(image.get("file_name", "")) for image in images}
        self.annotations = [
            self._annotation(image, anns, labels)
            for image, anns in zip(images, objects, strict=True)
        ]
        for image_id in self.image_ids:
            if not self.image_path(image_id).is_file():
                raise DatasetError(
                    self.image_path(image_id),
                    f"image file of image id {image_id} is missing; file names are relative to {self.root}",
                )

    def _categories(
        self,
        cats: dict[int, dict],
        objects: list[list[dict]],
        given: tuple[str, ...] | list[str] | None,
    ) -> tuple[tuple[str, ...], tuple[int | None, ...]]:
        """(class names, category id of each label): the file's own, or matched to ``given`` by name
        (DatasetError when a kept object's category is not among ``given``)."""
        ids = sorted(cats)
        names = [str(cats[i].get("name", i)) for i in ids]
        if len(set(names)) != len(names):
            raise DatasetError(self.ann_file, "two categories share a name; names must be unique")
        if given is None:
            return tuple(names), tuple(ids)
        given = tuple(given)
        for ann in (ann for anns in objects for ann in anns):
            name = cats.get(ann.get("category_id"), {}).get("name")
            if name is not None and name not in given:
                raise DatasetError(
                    self.ann_file,
                    f"category {name!r} (id {ann['category_id']}, image id {ann.get('image_id')}) "
                    f"never appears in the training split, whose classes are {', '.join(given)}; train "
                    "on a split that has it or leave it out of the test file",
                )
        by_name = dict(zip(names, ids, strict=True))
        return given, tuple(by_name.get(name) for name in given)

    def _annotation(self, image: dict, anns: list[dict], labels: dict[int, int]) -> Annotation:
        """One image's objects as an Annotation (DatasetError for a bad size, box or category)."""
        width, height = image.get("width"), image.get("height")
        if not all(_is_number(v) and v > 0 for v in (width, height)):
            raise DatasetError(
                self.ann_file,
                f"image id {image['id']} has no positive width and height; add them to its entry",
            )
        boxes, classes, crowd, areas = [], [], [], []
        for ann in anns:
            where = f"annotation {ann.get('id')} of image id {image['id']}"
            if ann.get("category_id") not in labels:
                raise DatasetError(
                    self.ann_file,
                    f"{where} has category_id {ann.get('category_id')}, which is not among the "
                    "file's categories; add the category or fix the annotation",
                )
            boxes.append(self._box(ann, where, width, height))
            classes.append(labels[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
            area = ann.get("area")
            x1, y1, x2, y2 = boxes[-1]
            areas.append(area if _is_number(area) and area > 0 else (x2 - x1) * (y2 - y1))
        return Annotation(
            image_id=str(image["id"]),
            size=(int(height), int(width)),
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(classes, dtype=np.int64),
            difficult=np.asarray(crowd, dtype=bool),
            areas=np.asarray(areas, dtype=np.float64),
        )

    def _box(self, ann: dict, where: str, width: float, height: float) -> tuple[float, ...]:
        """xyxy of one object's [x, y, w, h] bbox, checked to lie inside the image with some area."""
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(self.ann_file, f"{where} has no [x, y, w, h] bbox of numbers")
        x, y, w, h = (float(v) for v in bbox)
        text = f"box [x, y, w, h] = [{x:g}, {y:g}, {w:g}, {h:g}] of {where}"
        if w <= 0 or h <= 0:
            raise DatasetError(self.ann_file, f"{text} has no area; fix or remove the annotation")
        if x < 0 or y < 0 or x + w > width or y + h > height:
            raise DatasetError(
                self.ann_file,
                f"{text} lies outside the {width:g}x{height:g} image; fix the box or the image size",
            )
        return x, y, x + w, y + h

    @property
    def name(self) -> str:
        """The folder holding the annotation file (its parent when that folder is "annotations", as
        in COCO's own layout), used in cache keys and reports."""
        folder = self.ann_file.resolve().parent
        return folder.parent.name if folder.name.lower() == "annotations" else folder.name

    @property
    def fingerprint(self) -> str:
        """Short hash of the split's ids, file names, sizes, boxes, labels and crowd flags and its
        image files' sizes, for cache keys."""
        digest = hashlib.sha1()
        for image_id, ann in zip(self.image_ids, self.annotations, strict=True):
            digest.update(f"{image_id}\0{self._files[image_id]}\0{ann.size}\0".encode())
            for array in (ann.boxes, ann.labels, ann.difficult):
                digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(str(self.image_path(image_id).stat().st_size).encode())
        return digest.hexdigest()[:12]

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (labels run 1..K)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: str) -> Path:
        return self.root / self._files[image_id]

    def load_image(self, index: int) -> np.ndarray:
        """RGB uint8 (H, W, 3) of image ``index``; DatasetError when it is missing or corrupt or its
        size disagrees with the annotation file."""
        path = self.image_path(self.image_ids[index])
        image = read_image(path)
        if image.shape[:2] != self.annotations[index].size:
            raise DatasetError(
                path,
                f"image id {self.image_ids[index]} is {image.shape[1]}x{image.shape[0]} but "
                f"{self.ann_file.name} says {self.annotations[index].size[1]}x"
                f"{self.annotations[index].size[0]}",
            )
        return image
