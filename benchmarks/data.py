"""Harness stages that load data: the dataset splits, the shared proposals, the images in memory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.config import RunConfig
from datasets.coco import COCODataset
from datasets.loaders import open_splits
from datasets.synthetic import generate
from datasets.voc import VOCDataset
from pipelines.detector import TrainData
from pipelines.progress import progress
from pipelines.proposals import ProposalSet, load_or_compute

__all__ = [
    "Splits",
    "TestSet",
    "ensure_dataset",
    "load_splits",
    "load_test_set",
    "load_train_set",
    "log",
    "shared_proposals",
]


def log(message: str) -> None:
    print(f"[rcnn-bench] {message}", flush=True)


@dataclass
class Splits:
    """The two splits of one run.

    Attributes:
        train, test: the opened splits (annotations parsed and checked).
        kind: "voc", "coco", "synthetic", or "synthetic (VOC folder missing)".
        root: the folder they come from.
    """

    train: VOCDataset | COCODataset
    test: VOCDataset | COCODataset
    kind: str
    root: Path

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes


@dataclass
class TestSet:
    """The test split in memory, on the device, as the timing loop takes it.

    Attributes:
        images: per image, Tensor[H, W, 3] uint8.
        boxes: per image, Tensor[R, 4] of shared proposals (empty when no pipeline uses them).
        annotations: per image, the ground truth.
    """

    images: list[torch.Tensor]
    boxes: list[torch.Tensor]
    annotations: list


def ensure_dataset(cfg: RunConfig) -> tuple[Path, str]:
    """The VOC-format folder to use, generating synthetic data when the config asks for it.

    Returns:
        (folder, a description for the results).
    """
    data = cfg.data
    root = Path(data.root)
    synthetic_root = root
    if data.kind == "coco":
        return root, "coco"
    if data.kind == "voc":
        if (root / "Annotations").is_dir():
            return root, "voc"
        if not data.fallback_to_synthetic:
            raise ValueError(f"{root}: VOC folder not found (run scripts/fetch_voc2007.sh)")
        synthetic_root = root.parent / f"synthetic-fallback-{data.synthetic.seed}"
        log(f"{root} not found: using synthetic images of the configured size at {synthetic_root}")
    marker = synthetic_root / ".generated.json"
    wanted = json.dumps(dataclasses.asdict(data.synthetic), sort_keys=True)
    if not marker.is_file() or marker.read_text() != wanted:
        log(f"generating synthetic data into {synthetic_root}")
        generate(synthetic_root, data.synthetic)
        marker.write_text(wanted)
    kind = "synthetic" if data.kind == "synthetic" else "synthetic (VOC folder missing)"
    return synthetic_root, kind


def load_splits(cfg: RunConfig) -> Splits:
    """Open the train and test splits the config names (generating synthetic data if asked)."""
    root, kind = ensure_dataset(cfg)
    data = cfg.data
    train, test = open_splits(
        "coco" if kind == "coco" else "voc",
        root,
        data.train_split,
        data.test_split,
        data.train_limit,
        data.test_limit,
        images=data.images,
    )
    return Splits(train, test, kind, root)


def shared_proposals(cfg: RunConfig, splits: Splits) -> dict[str, ProposalSet]:
    """Selective-search proposals of both splits, from the cache or computed and cached."""
    out = {}
    for ds in (splits.train, splits.test):
        out[ds.split], cached = load_or_compute(
            ds, cfg.proposals, cfg.cache_dir, cfg.proposal_workers
        )
        log(f"proposals {ds.split}: {'read from cache' if cached else 'computed and cached'}")
    return out


def _images(ds: VOCDataset | COCODataset) -> list[np.ndarray]:
    desc = f"loading {ds.name}/{ds.split}"
    return [ds.load_image(i) for i in progress(range(len(ds)), desc, "img")]


def load_train_set(
    splits: Splits, proposals: dict[str, ProposalSet] | None, train_difficult: bool = False
) -> TrainData:
    """The training split decoded into memory, with its shared proposals (empty arrays when no
    pipeline uses them)."""
    ds = splits.train
    boxes = proposals[ds.split].boxes if proposals else [np.zeros((0, 4), np.float32)] * len(ds)
    return TrainData(_images(ds), ds.annotations, boxes, ds.num_classes, train_difficult)


def load_test_set(
    splits: Splits, proposals: dict[str, ProposalSet] | None, device: torch.device
) -> TestSet:
    """The test split decoded and moved to ``device``, with its shared proposals."""
    ds = splits.test
    images = [torch.from_numpy(x).to(device) for x in _images(ds)]
    if proposals:
        boxes = [torch.from_numpy(b).to(device) for b in proposals[ds.split].boxes]
    else:
        boxes = [torch.zeros((0, 4), device=device) for _ in images]
    return TestSet(images, boxes, ds.annotations)
