"""Convert a dataset between VOC and COCO formats, both ways, without changing a box.

VOC folder -> one COCO json per split plus an images folder; COCO jsons -> a VOC folder. Boxes go
through the readers (VOCDataset, COCODataset), so each format's coordinate convention is applied in its
own module only: VOC's 1-based inclusive pixels (xmin = x1 + 1, xmax = x2) and COCO's [x, y, w, h].
Difficult objects and crowd objects map onto each other. Images are hard-linked where the filesystem
allows and copied where it does not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from rcnn_bench.datasets.coco import COCODataset, coco_json
from rcnn_bench.datasets.voc import DatasetError, VOCDataset, write_annotation

__all__ = ["coco_to_voc", "voc_split_names", "voc_to_coco"]


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (replacing what is there), or copy it across filesystems."""
    if dst.exists() and dst.samefile(src):
        return
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def voc_split_names(voc_root: str | Path) -> list[str]:
    """The splits of a VOC folder: ImageSets/Main/<split>.txt files with one id a line (VOC's
    per-class <class>_<split>.txt files, with an id and a flag a line, are left out), sorted."""
    main = Path(voc_root) / "ImageSets" / "Main"
    names = []
    for path in sorted(main.glob("*.txt")):
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
        if all(len(fields) == 1 for fields in lines):
            names.append(path.stem)
    if not names:
        raise DatasetError(main, "no split files (<split>.txt with one image id a line)")
    return names


def _open_voc(voc_root: Path) -> dict[str, VOCDataset]:
    """Every split, all with one class list: classes.txt, else the sorted union of the splits'."""
    splits = {name: VOCDataset(voc_root, name) for name in voc_split_names(voc_root)}
    if (voc_root / "classes.txt").is_file():
        return splits
    classes = tuple(sorted({c for ds in splits.values() for c in ds.classes}))
    return {name: VOCDataset(voc_root, name, classes=classes) for name in splits}


def voc_to_coco(voc_root: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write <out_dir>/<split>.json for every split of a VOC folder and <out_dir>/images/<id>.jpg.

    An image has the same COCO id in every split file (its rank among all the folder's ids, from 1),
    and file_name "<voc id>.jpg". Categories are the classes, ids 1..K in class order.

    Args:
        voc_root: the VOC folder (JPEGImages/, Annotations/, ImageSets/Main/).
        out_dir: created if needed; files already there are replaced.

    Returns:
        split -> the json written.
    """
    voc_root, out_dir = Path(voc_root), Path(out_dir)
    splits = _open_voc(voc_root)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    all_ids = sorted({i for ds in splits.values() for i in ds.image_ids})
    number = {image_id: n for n, image_id in enumerate(all_ids, start=1)}
    any_split = next(iter(splits.values()))
    for image_id in all_ids:
        _place(any_split.image_path(image_id), images / f"{image_id}.jpg")
    written = {}
    for name, ds in splits.items():
        data = coco_json(ds.annotations, ds.classes, [number[i] for i in ds.image_ids])
        written[name] = out_dir / f"{name}.json"
        written[name].write_text(json.dumps(data))
    return written


def coco_to_voc(
    images_dir: str | Path, ann_files: dict[str, str | Path], out_root: str | Path
) -> Path:
    """Write a VOC folder from COCO annotation files: JPEGImages/, Annotations/ (1-based inclusive
    coordinates; fractional COCO coordinates keep their fraction), ImageSets/Main/<split>.txt and
    classes.txt.

    The first split's categories are the class list (the other splits take its labels by name); VOC
    ids are the images' file name stems, which must be unique, and the images must be JPEG files.

    Args:
        images_dir: the folder the jsons' file_name entries are relative to.
        ann_files: split name -> its annotation json, the training split first.
        out_root: the VOC folder to write (created if needed; files already there are replaced).

    Returns:
        ``out_root``.
    """
    out_root = Path(out_root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out_root / sub).mkdir(parents=True, exist_ok=True)
    classes = None
    sources: dict[str, Path] = {}
    for split, ann_file in ann_files.items():
        ds = COCODataset(images_dir, ann_file, split, classes=classes)
        classes = ds.classes
        ids = [_voc_image(ds, i, out_root, sources) for i in range(len(ds))]
        (out_root / "ImageSets" / "Main" / f"{split}.txt").write_text(
            "".join(f"{i}\n" for i in ids)
        )
    (out_root / "classes.txt").write_text("".join(f"{name}\n" for name in classes or ()))
    return out_root


def _voc_image(ds: COCODataset, index: int, out_root: Path, sources: dict[str, Path]) -> str:
    """Place image ``index`` of ``ds`` and its XML in the VOC folder; returns its VOC id."""
    image_id = ds.image_ids[index]
    src = ds.image_path(image_id)
    if src.suffix.lower() not in (".jpg", ".jpeg"):
        raise DatasetError(
            src, f"image id {image_id} is not a .jpg; VOC folders hold JPEG files, convert it first"
        )
    stem = src.stem
    if sources.setdefault(stem, src) != src:
        raise DatasetError(
            src,
            f"image id {image_id} has the file name stem of {sources[stem]}; VOC ids are file "
            "name stems and must be unique",
        )
    _place(src, out_root / "JPEGImages" / f"{stem}.jpg")
    ann = dataclasses.replace(ds.annotations[index], image_id=stem)
    write_annotation(out_root / "Annotations" / f"{stem}.xml", ann, ds.classes)
    return stem
