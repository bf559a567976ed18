"""What a detector takes in and gives out: a training split in memory and one image's detections.

Shapes: G ground-truth objects, D detections.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rcnn_bench.datasets.voc import Annotation
from torch import Tensor

__all__ = ["Detections", "TrainData", "degenerate"]


@dataclass
class Detections:
    """One image's detections, on the CPU, sorted by descending score.

    Attributes:
        boxes: Tensor[D, 4] xyxy in the image's pixels.
        scores: Tensor[D].
        labels: Tensor[D] int64, 1..K.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    @classmethod
    def empty(cls) -> Detections:
        return cls(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long))


@dataclass
class TrainData:
    """A training split in memory: decoded images, their annotations and shared proposals.

    Attributes:
        images: list of RGB uint8 (H, W, 3) arrays.
        annotations: one per image.
        proposals: list of float32 (Ri, 4) xyxy boxes, one per image (without ground truth).
        num_classes: K.
        train_difficult: whether difficult objects are training targets (set per pipeline by
            Detector.training_split from its block's ``use_difficult``).
    """

    images: list[np.ndarray]
    annotations: list[Annotation]
    proposals: list[np.ndarray]
    num_classes: int
    train_difficult: bool = False

    def ground_truth(self, i: int) -> tuple[Tensor, Tensor]:
        """The training targets of image i: boxes (Tensor[G, 4]) and labels (Tensor[G]), difficult
        objects included only with ``train_difficult``, degenerate boxes (``degenerate``) never: a
        box one pixel wide or tall gives no region to learn from, and the run names them."""
        ann = self.annotations[i]
        keep = np.ones(len(ann.labels), bool) if self.train_difficult else ~ann.difficult
        keep &= ~degenerate(ann.boxes)
        return torch.from_numpy(ann.boxes[keep]), torch.from_numpy(ann.labels[keep])


def degenerate(boxes: np.ndarray) -> np.ndarray:
    """bool (N,): xyxy boxes (N, 4) at most one pixel wide or tall."""
    return ((boxes[:, 2] - boxes[:, 0]) <= 1) | ((boxes[:, 3] - boxes[:, 1]) <= 1)
