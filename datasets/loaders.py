"""Open a training and a test split of either format, numbering classes alike in both."""

from __future__ import annotations

from pathlib import Path

from rcnn_bench.datasets.coco import COCODataset
from rcnn_bench.datasets.voc import VOCDataset

__all__ = ["DATASET_KINDS", "open_splits"]

DATASET_KINDS = ("voc", "coco")

ImagesArg = str | Path | tuple[str | Path, str | Path] | None


def open_splits(
    kind: str,
    root: str | Path,
    train: str,
    test: str,
    train_limit: int | None = None,
    test_limit: int | None = None,
    images: ImagesArg = None,
) -> tuple[VOCDataset | COCODataset, VOCDataset | COCODataset]:
    """The training split, then the test split opened with the training split's classes.

    Args:
        kind: "voc" or "coco".
        root: the VOC folder, or the folder of a COCO dataset.
        train: the training split: a VOC split name ("trainval"), or for COCO its annotation json
            (relative to ``root`` unless absolute; its file name stem names the split).
        test: the test split, as ``train``.
        train_limit: keep the first this many training images (None: all).
        test_limit: keep the first this many test images (None: all).
        images: COCO only: the images folder of both splits, or a (train, test) pair of folders
            (COCO 2017 keeps train2017/ and val2017/ apart); relative to ``root`` unless absolute.
            None: ``root`` itself.

    Returns:
        (train_ds, test_ds), with test_ds.classes == train_ds.classes.

    Raises:
        ValueError: an unknown kind, or ``images`` given for VOC.
        DatasetError: what the readers raise, including a test class the training split lacks.
    """
    root = Path(root)
    if kind == "voc":
        if images is not None:
            raise ValueError("images is for kind 'coco'; a VOC folder keeps them in JPEGImages/")
        train_ds = VOCDataset(root, train, train_limit)
        return train_ds, VOCDataset(root, test, test_limit, classes=train_ds.classes)
    if kind == "coco":
        pair = images if isinstance(images, tuple) else (images, images)
        train_dir, test_dir = (root / folder if folder is not None else root for folder in pair)
        train_ds = COCODataset(train_dir, root / train, Path(train).stem, train_limit)
        test_ds = COCODataset(
            test_dir, root / test, Path(test).stem, test_limit, classes=train_ds.classes
        )
        return train_ds, test_ds
    raise ValueError(f"dataset kind {kind!r} is not one of {', '.join(DATASET_KINDS)}")
