"""What several pipeline tests share: proposals made from the ground truth, and a record of the learning
rates SGD actually used."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import numpy as np
import torch
from rcnn_bench.datasets.voc import Annotation


def jittered_proposals(annotations: list[Annotation], per_box: int, seed: int) -> list[np.ndarray]:
    """Per image, ``per_box`` float32 boxes around each ground-truth box (shifted by up to a quarter of
    its size), clipped to the image: foreground and background RoIs without selective search."""
    rng = np.random.default_rng(seed)
    out = []
    for ann in annotations:
        h, w = ann.size
        boxes = np.repeat(ann.boxes, per_box, axis=0)
        wh = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        boxes = boxes + wh * rng.uniform(-0.25, 0.25, size=boxes.shape)
        boxes = np.clip(boxes, 0, [w, h, w, h])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 2)
        out.append(boxes.astype(np.float32))
    return out


@contextlib.contextmanager
def sgd_steps() -> Iterator[list[list[dict]]]:
    """Record every torch.optim.SGD step: per step, per parameter group, its "lr", "lr_mult",
    "weight_decay" and the ids of its parameters."""
    steps: list[list[dict]] = []
    step = torch.optim.SGD.step

    def recording(opt, *args, **kwargs):
        steps.append(
            [
                {
                    "lr": g["lr"],
                    "lr_mult": g.get("lr_mult", 1.0),
                    "weight_decay": g["weight_decay"],
                    "params": {id(p) for p in g["params"]},
                }
                for g in opt.param_groups
            ]
        )
        return step(opt, *args, **kwargs)

    with mock.patch.object(torch.optim.SGD, "step", autospec=True, side_effect=recording):
        yield steps
