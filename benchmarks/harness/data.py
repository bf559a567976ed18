"""Harness stages that load data: the dataset splits, the shared proposals, the images in memory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rcnn_bench.benchmarks.config import DataConfig
from rcnn_bench.datasets.coco import COCODataset
from rcnn_bench.datasets.describe import describe
from rcnn_bench.datasets.loaders import open_splits
from rcnn_bench.datasets.synthetic import generate
from rcnn_bench.datasets.voc import VOCDataset
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.parts.proposals import ProposalConfig, ProposalSet, load_or_compute
from rcnn_bench.pipelines.runtime.progress import log, progress

__all__ = [
    "SMALL_SHARE",
    "Splits",
    "TestSet",
    "ensure_dataset",
    "load_splits",
    "load_test_set",
    "load_train_set",
    "object_floors",
    "shared_proposals",
    "size_warnings",
]


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


def ensure_dataset(data: DataConfig) -> tuple[Path, str]:
    """The VOC-format folder to use, generating synthetic data when ``data`` asks for it.

    Returns:
        (folder, a description for the results).
    """
    root = Path(data.root)
    synthetic_root = root
    if data.kind == "coco":
        return root, "coco"
    if data.kind == "voc":
        if (root / "Annotations").is_dir():
            return root, "voc"
        if not data.fallback_to_synthetic:
            raise ValueError(
                f"{root}: VOC folder not found (set data.root to a folder with JPEGImages/, "
                "Annotations/ and ImageSets/Main/; scripts/fetch_voc2007.sh fetches VOC2007)"
            )
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


def load_splits(data: DataConfig) -> Splits:
    """Open the train and test splits ``data`` names (generating synthetic data if asked)."""
    root, kind = ensure_dataset(data)
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


def shared_proposals(
    cfg: ProposalConfig, cache_dir: str, workers: int, splits: Splits
) -> dict[str, ProposalSet]:
    """Selective-search proposals of both splits as ``cfg`` says, from the cache in ``cache_dir``
    or computed by ``workers`` processes and cached."""
    out = {}
    for ds in (splits.train, splits.test):
        out[ds.split], cached = load_or_compute(ds, cfg, cache_dir, workers)
        log(f"proposals {ds.split}: {'read from cache' if cached else 'computed and cached'}")
    return out


def _images(ds: VOCDataset | COCODataset) -> list[np.ndarray]:
    desc = f"loading {ds.name}/{ds.split}"
    return [ds.load_image(i) for i in progress(range(len(ds)), desc, "img")]


def load_train_set(splits: Splits, proposals: dict[str, ProposalSet] | None) -> TrainData:
    """The training split decoded into memory, with its shared proposals (empty arrays when no
    pipeline uses them)."""
    ds = splits.train
    boxes = proposals[ds.split].boxes if proposals else [np.zeros((0, 4), np.float32)] * len(ds)
    return TrainData(_images(ds), ds.annotations, boxes, ds.num_classes)


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


SMALL_SHARE = 0.2  # a class this much below a pipeline's floor gets a warning


def object_floors(detectors: dict[str, Detector]) -> dict[str, tuple]:
    """Each pipeline's ObjectFloor as datasets.describe takes it: (unit, knob, side)."""
    floors = {name: det.object_floor() for name, det in detectors.items()}
    return {name: (f.unit, f.knob, f.side) for name, f in floors.items() if f is not None}


def size_warnings(splits: Splits, floors: dict[str, tuple]) -> list[str]:
    """One line per split with degenerate boxes (left out of training), and one per test class of
    which SMALL_SHARE or more of the objects are smaller than some pipeline's floor, naming the
    pipelines' knobs."""
    lines = []
    for ds in (splits.train, splits.test):
        bad = describe(ds)["degenerate"]
        if bad["count"]:
            more = ", ..." if bad["count"] > len(bad["examples"]) else ""
            lines.append(
                f"{ds.split}: {bad['count']} degenerate boxes (at most one pixel wide or tall: "
                f"{', '.join(bad['examples'])}{more}) are scored but not trained on; fix or remove "
                "them in the annotations"
            )
    below = describe(splits.test, None, floors).get("below_floor", {})
    for cls in splits.classes:
        groups: dict[tuple[str, str], list[str]] = {}  # (share, unit) -> pipelines
        knobs = []
        for name, b in below.items():
            share = b["per_class"][cls]
            if b["knob"] and share is not None and share >= SMALL_SHARE:
                groups.setdefault((f"{share:.0%}", b["unit"]), []).append(name)
                knobs.append(b["knob"])
        if groups:
            parts = "; ".join(
                f"{share} are smaller than {unit} for {', '.join(names)}"
                for (share, unit), names in groups.items()
            )
            lines.append(
                f"class {cls!r}: of its {splits.test.split} objects, {parts}: those pipelines "
                f"barely see them; raise {', '.join(knobs)}"
            )
    return lines
