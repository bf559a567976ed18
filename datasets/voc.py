"""Pascal VOC-format reader.

A VOC folder holds JPEGImages/<id>.jpg, Annotations/<id>.xml and ImageSets/Main/<split>.txt. The class
list is read from classes.txt at the folder's root (one name a line; the synthetic generator writes it).
Without that file the classes are given by the caller (the training split's, for a test split) or
discovered from the split's annotation files: the sorted set of their <name> values. VOC2007 ships no
classes.txt, and its 20 names sorted are VOC_CLASSES in order, so discovery numbers them as usual.

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
    "Annotation",
    "DatasetError",
    "VOCDataset",
    "object_names",
    "parse_annotation",
    "read_image",
    "write_annotation",
]

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
# VOC_CLASSES is sorted (a test checks it): class discovery, which sorts, gives VOC2007 this order.


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
        areas: float (N,), each object's area as a COCO file gives it (its segmentation's, which
            COCO's size classes go by), or None: the box's w * h (VOC, synthetic data).
    """

    image_id: str
    size: tuple[int, int]
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    areas: np.ndarray | None = None

    @property
    def coco_areas(self) -> np.ndarray:
        """float64 (N,): the area COCO's evaluation and size classes use (``areas``, else w * h)."""
        if self.areas is not None:
            return np.asarray(self.areas, np.float64)
        wh = self.boxes[:, 2:].astype(np.float64) - self.boxes[:, :2]
        return wh[:, 0] * wh[:, 1]


_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_JPEG_TAIL = 4096  # where the end-of-image marker must be: within this many bytes of the end


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); DatasetError when missing or undecodable."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "image file is missing")
    data = path.read_bytes()
    if not data:
        raise DatasetError(path, "image file is empty (0 bytes)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(path, "image cannot be decoded (corrupt or not an image)")
    # OpenCV decodes a cut-off JPEG with a grey bottom and only a warning: a whole JPEG ends with
    # its end-of-image marker FF D9 (some writers append a little after it).
    if data[:2] == _JPEG_START and _JPEG_END not in data[-_JPEG_TAIL:]:
        raise DatasetError(path, "JPEG file is truncated (no end-of-image marker); re-copy it")
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


def _load_xml(path: Path) -> ET.Element:
    if not path.is_file():
        raise DatasetError(path, "annotation file is missing")
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DatasetError(path, f"malformed XML ({err})") from None


def object_names(path: str | Path) -> list[str]:
    """The <name> of every <object> in one VOC XML file, in file order (DatasetError when the file is
    missing or malformed or an object has no name)."""
    path = Path(path)
    return [_text(obj, "name", path) for obj in _load_xml(path).findall("object")]


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
    root = _load_xml(path)
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


def _coordinate(value: float) -> str:
    """The shortest decimal that reads back as the same float32 ("12" for 12.0, "474.07")."""
    return np.format_float_positional(np.float32(value), trim="-")


def write_annotation(path: str | Path, ann: Annotation, classes: tuple[str, ...]) -> None:
    """Write one VOC XML file (1-based inclusive coordinates: xmin = x1 + 1, xmax = x2).

    Whole-pixel boxes are written as integers, as VOC's own files are; fractional ones (from COCO) keep
    their fraction, which parse_annotation reads back.
    """
    path = Path(path)
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = path.parent.parent.name
    ET.SubElement(root, "filename").text = f"{ann.image_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", ann.size[1]), ("height", ann.size[0]), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for box, label, difficult in zip(ann.boxes, ann.labels, ann.difficult, strict=True):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[label - 1]
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        bnd = ET.SubElement(obj, "bndbox")
        coords = (box[0] + 1, box[1] + 1, box[2], box[3])
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), coords, strict=True):
            ET.SubElement(bnd, tag).text = _coordinate(value)
    ET.indent(root)
    ET.ElementTree(root).write(path)


class VOCDataset:
    """One split of a VOC-format folder. Annotations are parsed and checked when it is opened.

    Args:
        root: the folder holding JPEGImages/, Annotations/ and ImageSets/Main/.
        split: the split name (ImageSets/Main/<split>.txt).
        limit: keep only the first ``limit`` images of the split (None keeps all).
        classes: the class list when the folder has no classes.txt: pass the training split's to the
            test split so both number classes alike. None discovers them from the whole split's
            annotation files (the sorted set of names; ``limit`` does not change it). Ignored in
            favour of classes.txt when that file exists, unless it disagrees (DatasetError).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        limit: int | None = None,
        classes: tuple[str, ...] | list[str] | None = None,
    ):
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(self.root, "dataset folder does not exist")
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(split_file, f"split file for {split!r} is missing")
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(split_file, "split file lists no images")
        seen: dict[str, int] = {}
        for line, image_id in enumerate(ids, start=1):
            if image_id in seen:
                raise DatasetError(
                    split_file,
                    f"image id {image_id!r} is listed twice (entries {seen[image_id]} and {line}); "
                    "each image may appear once",
                )
            seen[image_id] = line
        self.image_ids = ids[:limit] if limit else ids
        self.classes = self._classes(ids, None if classes is None else tuple(classes))
        self.annotations = [parse_annotation(self._xml(i), self.classes) for i in self.image_ids]
        for image_id in self.image_ids:
            if not self.image_path(image_id).is_file():
                raise DatasetError(self.image_path(image_id), "image file is missing")

    def _xml(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def _classes(self, all_ids: list[str], given: tuple[str, ...] | None) -> tuple[str, ...]:
        listed = self._read_classes()
        if listed is not None:
            if given is not None and given != listed:
                raise DatasetError(
                    self.root / "classes.txt",
                    f"lists {', '.join(listed)} but the training split's classes are "
                    f"{', '.join(given)}; open both splits from the same folder",
                )
            return listed
        if given is None:
            found = {name for i in all_ids for name in object_names(self._xml(i))}
            if not found:
                raise DatasetError(
                    self.root / "ImageSets" / "Main" / f"{self.split}.txt",
                    "the split's annotations name no object to discover classes from; write "
                    f"{self.root / 'classes.txt'} (one name a line)",
                )
            return tuple(sorted(found))
        for image_id in self.image_ids:
            unseen = [n for n in object_names(self._xml(image_id)) if n not in given]
            if unseen:
                raise DatasetError(
                    self._xml(image_id),
                    f"class {unseen[0]!r} is not among the training split's classes "
                    f"({', '.join(given)}); a classes.txt at {self.root} fixes the order or the set",
                )
        return given

    def _read_classes(self) -> tuple[str, ...] | None:
        path = self.root / "classes.txt"
        if not path.is_file():
            return None
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
            digest.update(self._xml(image_id).read_bytes())
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
