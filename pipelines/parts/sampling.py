"""Matching proposals to ground truth and sampling foreground/background mini-batches.

The detectors fine-tune on regions labelled by their best-overlapping ground-truth box: R-CNN draws
128-region batches (32 foreground at IoU >= 0.5, 96 background below 0.5) across the training set,
Fast R-CNN 64 RoIs per image (25% foreground, background IoU in [0.1, 0.5)). One rule serves them all:
sample_fg_bg draws from one image's few thousand regions; RegionIndex finds the foreground and
background of a whole training set once (R-CNN's ~10M regions on VOC07) and then draws each batch in
time proportional to the batch, not to the set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rcnn_bench.pipelines.parts.boxes import box_iou
from torch import Tensor

__all__ = [
    "Matches",
    "RegionIndex",
    "match",
    "sample_fg_bg",
    "sample_without_replacement",
    "with_ground_truth",
]


@dataclass
class Matches:
    """What each proposal overlaps most.

    Attributes:
        iou: Tensor[R], the best IoU with any ground-truth box (0 when there is none).
        gt_index: Tensor[R] int64, which ground-truth box that is (0 when there is none).
        labels: Tensor[R] int64, its class 1..K, or 0 (background) when ``iou`` is below ``fg_iou``.
    """

    iou: Tensor
    gt_index: Tensor
    labels: Tensor


def match(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, fg_iou: float) -> Matches:
    """Match each proposal (Tensor[R, 4]) to its best ground-truth box (Tensor[G, 4], labels [G])."""
    r = proposals.shape[0]
    if gt_boxes.shape[0] == 0:
        zero = torch.zeros(r, dtype=torch.long)
        return Matches(torch.zeros(r), zero, zero.clone())
    iou, gt_index = box_iou(proposals, gt_boxes).max(dim=1)
    labels = torch.where(iou >= fg_iou, gt_labels[gt_index], torch.zeros_like(gt_index))
    return Matches(iou, gt_index, labels)


def sample_fg_bg(
    iou: Tensor,
    batch_size: int,
    fg_fraction: float,
    fg_iou: float,
    bg_iou: tuple[float, float],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Draw foreground and background indices without replacement.

    Foreground: iou >= fg_iou, at most round(batch_size * fg_fraction) of them. Background:
    bg_iou[0] <= iou < bg_iou[1], filling the rest of the batch. Fewer are returned when fewer exist.

    Args:
        iou (Tensor[R]): each candidate's best IoU with ground truth.
        batch_size: regions in the batch.
        fg_fraction: the share of foreground (0.25 for both papers' settings).
        fg_iou: foreground threshold (0.5).
        bg_iou: the background band (R-CNN (0, 0.5), Fast R-CNN (0.1, 0.5)).
        generator: the random stream (training is seeded).

    Returns:
        (Tensor[F] int64, Tensor[B] int64): foreground and background indices into ``iou``.
    """
    fg, bg = _fg_bg_rows(iou, fg_iou, bg_iou)
    n_fg, n_bg = _batch_counts(batch_size, fg_fraction, fg.numel(), bg.numel())
    fg = fg[torch.randperm(fg.numel(), generator=generator)[:n_fg]]
    bg = bg[torch.randperm(bg.numel(), generator=generator)[:n_bg]]
    return fg, bg


def _fg_bg_rows(iou: Tensor, fg_iou: float, bg_iou: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Rows with iou >= fg_iou, and rows with bg_iou[0] <= iou < bg_iou[1]."""
    fg = torch.nonzero(iou >= fg_iou).flatten()
    bg = torch.nonzero((iou >= bg_iou[0]) & (iou < bg_iou[1])).flatten()
    return fg, bg


def _batch_counts(batch_size: int, fg_fraction: float, fg: int, bg: int) -> tuple[int, int]:
    """How many foreground (at most round(batch_size * fg_fraction)) and background (the rest of the
    batch) to draw when ``fg`` and ``bg`` exist."""
    n_fg = min(round(batch_size * fg_fraction), fg)
    return n_fg, min(batch_size - n_fg, bg)


def sample_without_replacement(population: int, n: int, generator: torch.Generator) -> Tensor:
    """``n`` distinct indices in [0, population), every subset equally likely (Floyd's algorithm), in
    O(n) time and memory whatever the population: for j = population - n, ..., population - 1, draw t
    uniform in [0, j] and take t, or j when t was taken already.

    Args:
        population: how many there are to choose from.
        n: how many to choose (at most ``population`` are returned).
        generator: the random stream (one uniform draw per index).

    Returns:
        Tensor[min(n, population)] int64.
    """
    n = min(n, population)
    u = torch.rand(n, generator=generator).tolist()
    chosen: dict[int, None] = {}  # an insertion-ordered set
    for k, j in enumerate(range(population - n, population)):
        t = min(int(u[k] * (j + 1)), j)
        chosen[j if t in chosen else t] = None
    return torch.tensor(list(chosen), dtype=torch.long)


@dataclass
class RegionIndex:
    """The foreground and background rows of a pool of regions, found once, so that each batch is drawn
    without walking the pool.

    Attributes:
        fg: Tensor[F] int64, the rows with iou >= fg_iou.
        bg: Tensor[B] int64, the rows with bg_iou[0] <= iou < bg_iou[1].
    """

    fg: Tensor
    bg: Tensor

    @classmethod
    def build(cls, iou: Tensor, fg_iou: float, bg_iou: tuple[float, float]) -> RegionIndex:
        """Index the pool whose best IoUs with ground truth are ``iou`` (Tensor[N])."""
        return cls(*_fg_bg_rows(iou, fg_iou, bg_iou))

    def sample(
        self, batch_size: int, fg_fraction: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """A batch as sample_fg_bg counts it (at most round(batch_size * fg_fraction) foreground, the
        rest background, fewer when fewer exist), each part drawn with sample_without_replacement
        (foreground first).

        Returns:
            (Tensor[F'] int64, Tensor[B'] int64): foreground and background rows of the pool.
        """
        n_fg, n_bg = _batch_counts(batch_size, fg_fraction, len(self.fg), len(self.bg))
        fg = self.fg[sample_without_replacement(len(self.fg), n_fg, generator)]
        bg = self.bg[sample_without_replacement(len(self.bg), n_bg, generator)]
        return fg, bg


def with_ground_truth(proposals: Tensor, gt_boxes: Tensor) -> Tensor:
    """Training proposals: the ground-truth boxes first, then the proposals (both originals do this;
    never at test time). Tensor[G + R, 4]."""
    return torch.cat((gt_boxes.to(proposals.dtype), proposals), dim=0)
