from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from datasets.describe import describe
from datasets.voc import Annotation


@dataclass
class TwoImages:
    """Just what describe reads: classes a, b, c (c has no object)."""

    split: str = "test"
    classes: tuple[str, ...] = ("a", "b", "c")

    def __post_init__(self):
        self.annotations = [
            Annotation(
                "one",
                (100, 100),
                np.array([[0, 0, 10, 10], [10, 10, 50, 50], [0, 0, 100, 100]], np.float32),
                np.array([1, 1, 2], np.int64),
                np.array([False, True, False]),
            ),  # areas 100 (small), 1600 (medium, difficult), 10000 (large)
            Annotation(
                "two",
                (200, 200),
                np.array([[0, 0, 32, 32], [0, 0, 96, 96]], np.float32),
                np.array([2, 1], np.int64),
                np.array([False, False]),
            ),  # areas 1024 = 32^2 (medium: small is below it), 9216 = 96^2 (large)
        ]

    def __len__(self):
        return 2


def test_counts_per_class_and_size():
    d = describe(TwoImages())
    assert d == {
        "split": "test",
        "images": 2,
        "objects": {
            "a": {"non_difficult": 2, "difficult": 1},
            "b": {"non_difficult": 2, "difficult": 0},
            "c": {"non_difficult": 0, "difficult": 0},
        },
        "sizes": {
            "small": {"non_difficult": 1, "difficult": 0},
            "medium": {"non_difficult": 1, "difficult": 1},
            "large": {"non_difficult": 2, "difficult": 0},
        },
    }


def test_proposal_recall_per_class_and_size():
    proposals = [
        # [0,0,10,12] on the small a: IoU 100/120. [0,0,70,70] on the large b: IoU 4900/10000 =
        # 0.49, missed. Nothing near the difficult medium a, which recall leaves out.
        np.array([[0, 0, 10, 12], [0, 0, 70, 70]], np.float32),
        # [0,0,32,64] on the medium b: IoU 1024/2048 = 0.5 exactly, found. [0,0,96,90] on the
        # large a: IoU 8640/9216.
        np.array([[0, 0, 32, 64], [0, 0, 96, 90]], np.float32),
    ]
    recall = describe(TwoImages(), proposals)["recall_iou50"]
    assert recall == {
        "per_class": {"a": 1.0, "b": 0.5, "c": None},
        "per_size": {"small": 1.0, "medium": 1.0, "large": 0.5},
    }
    with pytest.raises(ValueError, match="1 proposal sets for 2 images"):
        describe(TwoImages(), proposals[:1])


def test_no_proposals_finds_nothing():
    recall = describe(TwoImages(), [np.zeros((0, 4)), np.zeros((0, 4))])["recall_iou50"]
    assert recall["per_class"] == {"a": 0.0, "b": 0.0, "c": None}
