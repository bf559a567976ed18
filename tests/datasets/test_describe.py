from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from rcnn_bench.datasets.describe import describe
from rcnn_bench.datasets.voc import Annotation


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
        "degenerate": {"count": 0, "per_class": {"a": 0, "b": 0, "c": 0}, "examples": []},
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


def test_shares_below_each_pipelines_floor_per_class():
    # Floors as sides in the image's own pixels: 20 in the 100-pixel image, 40 in the 200-pixel one
    # (one 16-pixel cell at a factor of 0.8 and 0.4), and a flat 64 (a warp).
    floors = {
        "shared": ("cell", "pipelines.shared.scale", lambda size: 16 / (80 / min(size))),
        "warp": ("warp", None, lambda size: 64.0),
    }
    d = describe(TwoImages(), None, floors)
    # Non-difficult sides: a: 10 (image one, floor 20) and 96 (image two, floor 40); b: 100 (image
    # one) and 32 (image two, floor 40); c: none.
    assert d["below_floor"]["shared"] == {
        "unit": "cell",
        "knob": "pipelines.shared.scale",
        "per_class": {"a": 0.5, "b": 0.5, "c": None},
    }
    assert d["below_floor"]["warp"]["per_class"] == {"a": 0.5, "b": 0.5, "c": None}
    assert "below_floor" not in describe(TwoImages())


def test_degenerate_boxes_are_counted_and_named():
    split = TwoImages()
    split.annotations[1] = Annotation(
        "two",
        (200, 200),
        np.array([[0, 0, 1, 30], [5, 5, 6.5, 6.5], [0, 0, 30, 0.5]], np.float32),
        np.array([2, 1, 3], np.int64),
        np.array([False, False, True]),
    )  # 1 pixel wide (b), 1.5 x 1.5 (a: not degenerate), 0.5 tall (c, difficult: counted all the same)
    d = describe(split)
    assert d["degenerate"] == {
        "count": 2,
        "per_class": {"a": 0, "b": 1, "c": 1},
        "examples": ["two: b 1x30", "two: c 30x0.5"],
    }
    assert describe(TwoImages())["degenerate"]["count"] == 0
