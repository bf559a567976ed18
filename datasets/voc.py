"""Pascal VOC-format reader.

A VOC folder holds JPEGImages/<id>.jpg, Annotations/<id>.xml and ImageSets/Main/<split>.txt. The class
list is read from classes.txt at the folder's root (one name a line; the synthetic generator writes it)
and is VOC's 20 classes when that file is absent.

VOC XML coordinates are 1-based and inclusive: the box (xmin, xmax) covers pixels xmin..xmax. Here
boxes are continuous 0-based xyxy with width = x2 - x1, so x1 = xmin - 1 and x2 = xmax; this is the only
place that conversion happens.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "VOC_CLASSES",
    "DatasetError",
    "Annotation",
    "VOCDataset",
    "read_image",
    "parse_annotation",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


class DatasetError(ValueError):
    """Bad dataset input; the message is one line that names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem

    def __reduce__(self):
        # An exception pickles as ``cls(*self.args)``, and args here is the one formatted message,
        # which does not fit __init__(path, problem): without this a DatasetError raised in a worker
        # process could not be unpickled in the parent, which then only saw a broken process pool.
        return type(self), (self.path, self.problem)


@dataclass(frozen=True)
class Annotation:
    """One image's objects.

    Attributes:
        image_id: the id in the split file.
        size: (H, W) in pixels.
        boxes: float32 (N, 4) xyxy, 0-based.
        labels: int64 (N,), classes 1..K (0 is background and never appears here).
        difficult: bool (N,), VOC's difficult flag.
    """

    image_id: str
    size: tuple[int, int]
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); DatasetError when missing or undecodable."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "image file is missing")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(path, "image cannot be decoded (corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _text(node: ET.Element, tag: str, path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(path, f"<{node.tag}> has no <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    text = _text(node, tag, path)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(path, f"<{tag}> is {text!r}, not a number") from None


def parse_annotation(path: str | Path, classes: tuple[str, ...]) -> Annotation:
    """Parse one VOC XML file.

    Args:
        path: the XML file.
        classes: class names; an object's label is its index here plus one.

    Returns:
        Annotation with 0-based xyxy float boxes.

    Raises:
        DatasetError: malformed XML, missing fields, an unknown class, a box outside the image or with
            no area.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "annotation file is missing")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DatasetError(path, f"malformed XML ({err})") from None
    size = root.find("size")
    if size is None:
        raise DatasetError(path, "no <size> element")
    width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
    if width <= 0 or height <= 0:
        raise DatasetError(path, f"image size {width}x{height} is not positive")
    index = {name: i + 1 for i, name in enumerate(classes)}
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = _text(obj, "name", path)
        if name not in index:
            raise DatasetError(path, f"unknown class {name!r} (known: {', '.join(classes)})")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DatasetError(path, f"object {name!r} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bnd, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax
        if x2 <= x1 or y2 <= y1:
            raise DatasetError(
                path, f"box {xmin:g},{ymin:g},{xmax:g},{ymax:g} of {name!r} has no area"
            )
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise DatasetError(
                path,
                f"box {xmin:g},{ymin:g},{xmax:g},{ymax:g} of {name!r} lies outside the "
                f"{width}x{height} image",
            )
        flag = obj.find("difficult")
        boxes.append((x1, y1, x2, y2))
        labels.append(index[name])
        difficult.append(flag is not None and (flag.text or "0").strip() == "1")
    return Annotation(
        image_id=path.stem,
        size=(height, width),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
    )


class VOCDataset:
    """One split of a VOC-format folder. Annotations are parsed and checked when it is opened.

    Args:
        root: the folder holding JPEGImages/, Annotations/ and ImageSets/Main/.
        split: the split name (ImageSets/Main/<split>.txt).
        limit: keep only the first ``limit`` images of the split (None keeps all).
    """

    def __init__(self, root: str | Path, split: str, limit: int | None = None):
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(self.root, "dataset folder does not exist")
        self.classes = self._read_classes()
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(split_file, f"split file for {split!r} is missing")
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(split_file, "split file lists no images")
        self.image_ids = ids[:limit] if limit else ids
        self.annotations = [
            parse_annotation(self.root / "Annotations" / f"{i}.xml", self.classes)
            for i in self.image_ids
        ]
        for image_id in self.image_ids:
            if not self.image_path(image_id).is_file():
                raise DatasetError(self.image_path(image_id), "image file is missing")

    def _read_classes(self) -> tuple[str, ...]:
        path = self.root / "classes.txt"
        if not path.is_file():
            return VOC_CLASSES
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if not names or len(set(names)) != len(names):
            raise DatasetError(path, "class list is empty or repeats a name")
        return names

    @property
    def name(self) -> str:
        """Folder name, used in cache keys and reports."""
        return self.root.name

    @property
    def fingerprint(self) -> str:
        """Short hash of the split's ids, annotation files' contents and image files' sizes, for cache
        keys (regenerated images with the same annotations still change it)."""
        digest = hashlib.sha1()
        for image_id in self.image_ids:
            digest.update(image_id.encode() + b"\0")
            digest.update((self.root / "Annotations" / f"{image_id}.xml").read_bytes())
            digest.update(str(self.image_path(image_id).stat().st_size).encode())
        return digest.hexdigest()[:12]

    @property
    def num_classes(self) -> int:
        """K, the number of object classes (labels run 1..K)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def load_image(self, index: int) -> np.ndarray:
        """RGB uint8 (H, W, 3) of image ``index``; DatasetError when it is missing or corrupt or its
        size disagrees with the annotation."""
        path = self.image_path(self.image_ids[index])
        image = read_image(path)
        if image.shape[:2] != self.annotations[index].size:
            raise DatasetError(
                path,
                f"image is {image.shape[1]}x{image.shape[0]} but its annotation says "
                f"{self.annotations[index].size[1]}x{self.annotations[index].size[0]}",
            )
        return image
