"""The test-time steps every detector shares after it has scored its regions: which (region, class)
pairs become candidates (a fixed threshold, or the originals' per-class budget), then clipping,
per-class NMS and a cap per class.

Shapes: R proposals, K object classes (labels 1..K, background 0), M candidate detections.
"""

from __future__ import annotations

import copy
import math

import torch
from rcnn_bench.pipelines.parts.boxes import clip_boxes
from rcnn_bench.pipelines.parts.detections import Detections
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = ["TEST_TOPK", "ScoreBudget", "candidates", "select"]

# How test-time candidates are chosen (a pipeline config's ``test_topk``): "fixed" keeps the (region,
# class) pairs above a fixed score and at most ``max_per_class`` per class after NMS; "adaptive" is the
# originals' per-class budget (ScoreBudget).
TEST_TOPK = ("fixed", "adaptive")


def candidates(scores: Tensor, score_thresh: float) -> tuple[Tensor, Tensor]:
    """Which (proposal, class) pairs go on to box regression and NMS.

    Args:
        scores (Tensor[R, K]): per-class scores of classes 1..K.
        score_thresh: keep pairs scoring above this.

    Returns:
        (Tensor[M], Tensor[M]): proposal index and class index (0-based, so label = index + 1).
    """
    return torch.nonzero(scores > score_thresh, as_tuple=True)


class ScoreBudget:
    """The originals' test-time candidate rule (rcnn_test.m:44-103, lib/fast_rcnn/test.py:251-317).

    Per class, an image's candidates are its regions scoring above the class's threshold, at most
    ``max_per_image`` of them (the highest), before NMS. Over a pass, a tensor per class holds the
    ``max_per_set`` highest candidate scores so far (the originals' min-heap, on the device); once more
    than that many were kept, the threshold is their minimum, so it rises as the class's budget fills.
    At the end, ``prune`` drops the detections below each class's final threshold. NMS and this prune
    commute (a detection removed by the prune cannot have been needed to suppress one that stays,
    which scores no higher), so each image's NMS may run at once.
    """

    def __init__(self, num_classes: int, max_per_image: int, max_per_set: int | None):
        """``max_per_set`` None: a budget that records nothing (thresholds stay -inf)."""
        if max_per_image < 1 or (max_per_set is not None and max_per_set < 1):
            raise ValueError("a test-time budget needs max_per_image and max_per_set >= 1")
        self.max_per_image = max_per_image
        self.max_per_set = max_per_set
        # Kept on the scores' device, so that a pass never waits for the device: per class the
        # threshold, the max_per_set highest candidate scores so far (descending, -inf where fewer)
        # and the candidates kept so far. float64 holds every score of any dtype exactly.
        self._thresh = torch.full((num_classes,), -math.inf, dtype=torch.float64)
        self._kept = torch.full((num_classes, max_per_set or 0), -math.inf, dtype=torch.float64)
        self._counts = torch.zeros(num_classes, dtype=torch.long)

    @property
    def thresholds(self) -> list[float]:
        """Each class's threshold (-inf until its budget fills); reading it waits for the device."""
        return self._thresh.tolist()

    def _to(self, device: torch.device) -> None:
        if self._thresh.device != device:
            self._thresh, self._kept, self._counts = (
                t.to(device) for t in (self._thresh, self._kept, self._counts)
            )

    def candidates(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """One image's candidates, recorded in the budget (on the scores' device, no host sync).

        Args:
            scores (Tensor[R, K]): per-class scores of classes 1..K.

        Returns:
            (Tensor[M], Tensor[M]): proposal index and class index (0-based), highest-ranked first.
        """
        self._to(scores.device)
        thresh = self._thresh.to(scores.dtype)  # exact: every threshold is one of the scores
        n = min(self.max_per_image, scores.shape[0])
        top, rows = torch.where(scores > thresh, scores, -math.inf).topk(n, dim=0)  # (n, K)
        keep = top > thresh  # drops the -inf fill of classes with fewer than n above threshold
        if self.max_per_set is not None:
            self._record(torch.where(keep, top, -math.inf).T, keep.sum(0))
        cls = torch.arange(scores.shape[1], device=scores.device).expand_as(rows)
        return rows[keep], cls[keep]

    def _record(self, new: Tensor, count: Tensor) -> None:
        """Add one image's candidate scores, ``new`` (K, n) with -inf where none, ``count`` (K,)
        of them per class: the kept top scores, the counts and, for a class with more than
        ``max_per_set`` kept, the threshold (the lowest of its kept top)."""
        both = torch.cat([self._kept, new.to(self._kept.dtype)], dim=1)
        self._kept = both.topk(self.max_per_set, dim=1).values
        self._counts = self._counts + count
        self._thresh = torch.where(self._counts > self.max_per_set, self._kept[:, -1], self._thresh)

    @classmethod
    def merge(cls, budgets: list[ScoreBudget]) -> ScoreBudget:
        """The budget of one test pass from the budgets of disjoint shares of its images (one per
        process under torchrun), each begun with the whole pass's ``max_per_set``.

        A class's threshold after a pass is the ``max_per_set``-th highest candidate score once more
        than ``max_per_set`` candidates were kept, in whatever order the images came: a candidate
        that a share's lower running threshold let in scores no higher than the one pass's threshold
        at that point, so it changes neither the top ``max_per_set`` nor, after ``prune``, the
        detections (to exact ties in score).
        """
        first = budgets[0]
        out = cls(len(first._thresh), first.max_per_image, first.max_per_set)
        kept = torch.cat([b._kept.cpu() for b in budgets], dim=1)
        out._kept = kept.topk(first.max_per_set, dim=1).values
        out._counts = sum(b._counts.cpu() for b in budgets)
        out._thresh = torch.where(out._counts > first.max_per_set, out._kept[:, -1], out._thresh)
        return out

    def copy(self) -> ScoreBudget:
        """An independent copy, on the CPU (a process's share of a pass, sent to the first)."""
        out = copy.copy(self)
        out._thresh, out._kept, out._counts = (
            t.cpu().clone() for t in (self._thresh, self._kept, self._counts)
        )
        return out

    def prune(self, detections: list[Detections], keep_ties: bool) -> list[Detections]:
        """Each image's detections without those below their class's final threshold (with
        ``keep_ties`` false, without those equal to it too)."""
        thresh = torch.tensor([-math.inf, *self.thresholds])  # indexed by label
        out = []
        for d in detections:
            limit = thresh[d.labels].to(d.scores.dtype)
            keep = d.scores >= limit if keep_ties else d.scores > limit
            out.append(Detections(d.boxes[keep], d.scores[keep], d.labels[keep]))
        return out


def select(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    size: tuple[int, int],
    nms_iou: float,
    max_per_class: int,
) -> Detections:
    """Clip, per-class NMS, and at most ``max_per_class`` per class (the highest scoring).

    Args:
        boxes (Tensor[M, 4]): candidate boxes (already regressed).
        scores (Tensor[M]): their scores.
        labels (Tensor[M]): their classes 1..K.
        size: the image's (H, W).
        nms_iou: suppress a box overlapping a higher-scoring box of its class more than this (0.3).
        max_per_class: detections kept per class (100).

    Returns:
        Detections on the CPU, highest score first.
    """
    if boxes.shape[0] == 0:
        return Detections.empty()
    boxes = clip_boxes(boxes, size)
    area_ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, labels = boxes[area_ok], scores[area_ok], labels[area_ok]
    keep = batched_nms(boxes.float(), scores.float(), labels, nms_iou)  # by descending score
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    # Rank of each detection within its class: a stable sort by label keeps the score order.
    by_label, order = torch.sort(labels, stable=True)
    _, counts = torch.unique_consecutive(by_label, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(by_label.numel(), device=labels.device) - starts.repeat_interleave(counts)
    kept = torch.sort(order[rank < max_per_class]).values
    return Detections(
        boxes[kept].float().cpu(), scores[kept].float().cpu(), labels[kept].long().cpu()
    )
