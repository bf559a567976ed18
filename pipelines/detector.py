"""The Detector interface the harness times, and the test-time steps both detectors share.

Shapes: R proposals, K object classes (labels 1..K, background 0), M candidate detections.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import heapq
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from datasets.voc import Annotation
from pipelines.backbones import IMAGENET_MEAN, IMAGENET_STD
from pipelines.boxes import clip_boxes
from pipelines.fidelity import Setting, setting
from pipelines.registry import BuildContext, PaperFigures
from pipelines.timing import StageTimer

__all__ = [
    "TEST_TOPK",
    "Detections",
    "Detector",
    "ScoreBudget",
    "TrainData",
    "candidates",
    "free_disk",
    "normalize_image",
    "select",
    "test_time_rows",
]

# How test-time candidates are chosen (a pipeline config's ``test_topk``): "fixed" keeps the (region,
# class) pairs above a fixed score and at most ``max_per_class`` per class after NMS; "adaptive" is the
# originals' per-class budget (ScoreBudget).
TEST_TOPK = ("fixed", "adaptive")


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
        train_difficult: whether difficult objects are training targets (both originals train on
            every object, difficult ones included: docs/design.md).
    """

    images: list[np.ndarray]
    annotations: list[Annotation]
    proposals: list[np.ndarray]
    num_classes: int
    train_difficult: bool = False

    def ground_truth(self, i: int) -> tuple[Tensor, Tensor]:
        """The training targets of image i: boxes (Tensor[G, 4]) and labels (Tensor[G]), difficult
        objects included only with ``train_difficult``."""
        ann = self.annotations[i]
        keep = np.ones(len(ann.labels), bool) if self.train_difficult else ~ann.difficult
        return torch.from_numpy(ann.boxes[keep]), torch.from_numpy(ann.labels[keep])


class Detector(abc.ABC):
    """What the harness knows of a detector. It never asks which one it is timing.

    A pipeline subclasses this, registers it (pipelines.registry.register) and declares:

    Attributes:
        name: the registry key and the config block's name under ``pipelines:``.
        label: how reports name it ("Fast R-CNN").
        config_class: its frozen config dataclass (the ``pipelines.<name>`` block).
        owns_proposals: True when it makes its own regions; the harness then passes no shared
            proposals to ``detect`` and adds no selective-search time to its end-to-end figure.
        variants: test-time alternatives the harness scores and times beside the default (a
            pipeline whose variants depend on its settings adds those in ``offered_variants``); a
            config block's ``variants`` list chooses among them ("all": every one).
        train_stages: the names ``fit`` records in its timer, in order.
        fixed_stages: those whose time grows neither with the iterations nor with the data (a
            dry run's estimate keeps their probe time).
        paper: the published figures shown beside a run's.
        stage_groups: each inference stage's share of the work, for the report's end-to-end bar:
            "conv" (the trunk), "per_region" (warping, pooling, fc layers run per region),
            "classifier" (scores, box regression, NMS) or "other" (the default for a stage not
            listed). Selective search is added by the harness as "proposals".
        variant_papers: per variant ("default": the default model), its published figure with the
            table it comes from, for the report's trade-off table.

    ``fit`` records its stages in the timer it is given; ``fit_variants`` then trains what the
    enabled variants need beyond the default model, in a timer of its own, so that their training
    is not the default model's; ``detect`` records its inference stages.

    A test pass (every test image once, scored together) is bracketed by ``start_pass`` and
    ``finish_pass``: with the originals' adaptive candidate budget (``test_topk`` "adaptive" in the
    config) ``detect`` updates per-class thresholds image by image and ``finish_pass`` applies the
    final ones; without it both are no-ops.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    config_class: ClassVar[type]
    owns_proposals: ClassVar[bool] = False
    variants: ClassVar[tuple[str, ...]] = ()
    train_stages: ClassVar[tuple[str, ...]] = ()
    fixed_stages: ClassVar[tuple[str, ...]] = ()  # training stages that take as long on any data
    paper: ClassVar[PaperFigures | None] = None
    stage_groups: ClassVar[dict[str, str]] = {}
    variant_papers: ClassVar[
        dict[str, str]
    ] = {}  # a variant's published figure, where there is one

    # In "adaptive" test_topk, whether the final prune keeps detections scoring exactly the class's
    # threshold (R-CNN drops only those below it, rcnn_test.m:99; Fast R-CNN keeps those above it,
    # lib/fast_rcnn/test.py:316).
    keeps_threshold_ties: ClassVar[bool] = False

    def __init__(self, cfg: Any, context: BuildContext):
        self.cfg = cfg
        self.num_classes = context.num_classes
        self.device = context.device
        self._budget: ScoreBudget | None = None  # the running test pass's, in "adaptive" test_topk
        self.enabled_variants()  # a variant the pipeline lacks fails here, before any training

    @classmethod
    def offered_variants(cls, cfg: Any) -> tuple[str, ...]:
        """Every test-time variant of this pipeline with the settings ``cfg``: the class's
        ``variants``."""
        return cls.variants

    @classmethod
    def chosen_variants(cls, cfg: Any) -> tuple[str, ...]:
        """The variants the config block ``cfg`` enables: those its ``variants`` list names ("all",
        or no such list: every offered variant), in the offered order.

        Raises:
            ValueError: the list names a variant the pipeline does not offer.
        """
        offered = cls.offered_variants(cfg)
        chosen = getattr(cfg, "variants", None)
        if chosen is None or "all" in chosen:
            return offered
        unknown = sorted(set(chosen) - set(offered))
        if unknown:
            raise ValueError(
                f"pipelines.{cls.name}.variants: {unknown[0]!r} is not a variant of {cls.name} "
                f"(its variants: {', '.join(offered) or 'none'}; or 'all')"
            )
        return tuple(v for v in offered if v in chosen)

    def enabled_variants(self) -> tuple[str, ...]:
        """The variants this run trains, times and scores (``chosen_variants`` of its config)."""
        return self.chosen_variants(self.cfg)

    def test_modules(self, variant: str | None = None) -> list[nn.Module]:
        """The modules that run at test time in ``variant``: their parameters are the model's size."""
        return []

    def test_tensors(self, variant: str | None = None) -> list[Tensor]:
        """Tensors outside modules that run at test time (SVM weights, regressors)."""
        return []

    def model_size(self, variant: str | None = None) -> dict[str, int]:
        """Parameters and bytes of the model actually run at test time in ``variant``."""
        params = {id(p): p for m in self.test_modules(variant) for p in m.parameters()}
        tensors = list(params.values()) + self.test_tensors(variant)
        return {
            "params": sum(t.numel() for t in tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
        }

    def start_pass(self, num_images: int) -> None:
        """A test pass over ``num_images`` images begins: with ``test_topk`` "adaptive" in the config,
        each class gets an empty budget of ``max_per_set_factor * num_images`` candidates and a
        threshold of -inf; otherwise nothing."""
        if getattr(self.cfg, "test_topk", "fixed") == "adaptive":
            cfg = self.cfg
            budget = cfg.max_per_set_factor * num_images
            self._budget = ScoreBudget(self.num_classes, cfg.max_per_image, budget)

    def finish_pass(self, detections: list[Detections]) -> list[Detections]:
        """The pass is over: its detections (one per image, in the pass's order) pruned to the final
        per-class thresholds in "adaptive" test_topk, unchanged otherwise. Ends the pass."""
        if self._budget is None:
            return detections
        pruned = self._budget.prune(detections, self.keeps_threshold_ties)
        self._budget = None
        return pruned

    def pass_state(self) -> ScoreBudget | None:
        """A copy of the running pass's budget (None outside a pass or in "fixed" test_topk)."""
        return None if self._budget is None else self._budget.copy()

    def restore_pass_state(self, state: ScoreBudget | None) -> None:
        """Put back a state from ``pass_state``: a repeated run of an image then counts once."""
        self._budget = None if state is None else state.copy()

    def join_pass_states(self, states: list[ScoreBudget | None]) -> None:
        """The pass ran as disjoint shares of its images, one per process, each begun with
        ``start_pass`` of the whole pass: its state becomes that of one pass over all the images
        (ScoreBudget.merge), so that ``finish_pass`` prunes as one process would."""
        self._budget = None if states[0] is None else ScoreBudget.merge(states)

    def test_budget(self) -> ScoreBudget | None:
        """What ``detect`` chooses candidates with: None in "fixed" test_topk; in "adaptive", the
        pass's budget, or outside a pass one that records nothing (the image is treated as a pass's
        first: at most ``max_per_image`` per class, no threshold)."""
        if getattr(self.cfg, "test_topk", "fixed") != "adaptive":
            return None
        if self._budget is not None:
            return self._budget
        return ScoreBudget(self.num_classes, self.cfg.max_per_image, None)

    @classmethod
    def fidelity(cls, cfg: Any) -> list:
        """This pipeline's settings beside its original's (pipelines.fidelity.Setting rows)."""
        return []

    @classmethod
    def cache_bytes(
        cls,
        cfg: Any,
        train_images: int,
        regions_per_image: int,
        backbone: Any,
        free_bytes: int | None = None,
    ) -> int:
        """An upper estimate of the disk its training caches take (0: it keeps none), so that a run
        can refuse before it starts when they will not fit. ``free_bytes``: the cache folder's free
        space, for a pipeline that chooses what to keep by it (None: the least it may keep)."""
        return 0

    @classmethod
    def train_ram_bytes(
        cls, cfg: Any, train_images: int, regions_per_image: int, backbone: Any
    ) -> int:
        """An estimate of the memory its training holds that grows with the training set (region
        indexes, per-image maps), beyond the network, its optimizer and one batch (0: none)."""
        return 0

    @classmethod
    def iteration_stages(cls, cfg: Any) -> dict[str, int]:
        """The training stages whose time grows with SGD iterations, each with the iterations ``cfg``
        runs; every other stage's time grows with the training images. Here: the first of
        ``train_stages`` runs ``cfg.solver.iters``."""
        return {cls.train_stages[0]: cfg.solver.iters}

    @classmethod
    def with_iterations(cls, cfg: Any, iters: int) -> Any:
        """``cfg`` with each stage of ``iteration_stages`` running ``iters`` iterations (the dry
        run's probe)."""
        return dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, iters=iters))

    @abc.abstractmethod
    def fit(self, data: TrainData, timer: StageTimer) -> dict:
        """Train on ``data``; returns facts to record (counts, sizes), stage times go to ``timer``."""

    def fit_variants(self, data: TrainData, timer: StageTimer) -> dict:
        """After ``fit``: train what the enabled variants need beyond the default model (SVMs on
        another layer, a truncated SVD). Each stage is recorded in ``timer`` as "<variant>/<stage>";
        returns facts to record per variant. The default: nothing to train."""
        return {}

    def detect(
        self, image: Tensor, proposals: Tensor | None, timer: StageTimer, variant: str | None = None
    ) -> Detections:
        """Detect objects in one image.

        Args:
            image: Tensor[H, W, 3] uint8 RGB, already on the device.
            proposals: Tensor[R, 4] float xyxy in image pixels, on the device (R may be 0: no
                detections); None for a pipeline that owns its proposals.
            timer: receives the inference stages.
            variant: one of ``variants``, or None for the default model.
        """
        if variant not in (None, *self.offered_variants(self.cfg)):
            raise ValueError(f"{self.name} has no test-time variant {variant!r}")
        if not self.owns_proposals and (proposals is None or proposals.shape[0] == 0):
            return Detections.empty()
        return self._detect(image, proposals, timer, variant)

    @abc.abstractmethod
    def _detect(
        self, image: Tensor, proposals: Tensor | None, timer: StageTimer, variant: str | None
    ) -> Detections:
        """``detect`` for a valid variant and, unless the pipeline owns its proposals, at least one
        proposal."""

    @abc.abstractmethod
    def paper_schedule(self, stages_s: dict[str, float]) -> dict:
        """Training hours extrapolated to the paper's iteration count, from measured stage times:
        {"iterations_run", "paper_iterations", "hours"}."""


def free_disk(folder: Path) -> int:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def normalize_image(image: Tensor) -> Tensor:
    """Tensor[H, W, 3] uint8 RGB -> Tensor[3, H, W] float, ImageNet mean subtracted and std divided.

    After this, zero is the mean colour: what R-CNN puts outside the image and what padding adds.
    """
    x = image.permute(2, 0, 1).float().div_(255.0)
    mean = x.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = x.new_tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


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
    ``max_per_image`` of them (the highest), before NMS. Over a pass, a min-heap per class holds the
    ``max_per_set`` highest candidate scores so far; once more than that many were kept, the threshold
    is the heap's minimum, so it rises as the class's budget fills. At the end, ``prune`` drops the
    detections below each class's final threshold. NMS and this prune commute (a detection removed by
    the prune cannot have been needed to suppress one that stays, which scores no higher), so each
    image's NMS may run at once.
    """

    def __init__(self, num_classes: int, max_per_image: int, max_per_set: int | None):
        """``max_per_set`` None: a budget that records nothing (thresholds stay -inf)."""
        if max_per_image < 1 or (max_per_set is not None and max_per_set < 1):
            raise ValueError("a test-time budget needs max_per_image and max_per_set >= 1")
        self.max_per_image = max_per_image
        self.max_per_set = max_per_set
        self.thresholds = [-math.inf] * num_classes
        self.kept: list[list[float]] = [[] for _ in range(num_classes)]  # one min-heap per class
        self.counts = [0] * num_classes  # candidates kept so far, per class

    def candidates(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """One image's candidates, recorded in the budget.

        Args:
            scores (Tensor[R, K]): per-class scores of classes 1..K.

        Returns:
            (Tensor[M], Tensor[M]): proposal index and class index (0-based), highest-ranked first.
        """
        thresh = scores.new_tensor(self.thresholds)
        n = min(self.max_per_image, scores.shape[0])
        top, rows = torch.where(scores > thresh, scores, -math.inf).topk(n, dim=0)  # (n, K)
        keep = top > thresh  # drops the -inf fill of classes with fewer than n above threshold
        if self.max_per_set is not None:
            for j, column in enumerate(torch.where(keep, top, -math.inf).T.tolist()):
                self._record(j, [v for v in column if v > -math.inf])
        cls = torch.arange(scores.shape[1], device=scores.device).expand_as(rows)
        return rows[keep], cls[keep]

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
        out = cls(len(first.thresholds), first.max_per_image, first.max_per_set)
        for j in range(len(out.thresholds)):
            kept = sorted(v for b in budgets for v in b.kept[j])  # ascending: a min-heap
            out.kept[j] = kept[-first.max_per_set :]
            out.counts[j] = sum(b.counts[j] for b in budgets)
            if out.counts[j] > first.max_per_set:
                out.thresholds[j] = out.kept[j][0]
        return out

    def copy(self) -> ScoreBudget:
        """An independent copy (the heaps hold floats: copying the lists is enough)."""
        out = copy.copy(self)
        out.thresholds, out.counts = list(self.thresholds), list(self.counts)
        out.kept = [list(heap) for heap in self.kept]
        return out

    def _record(self, j: int, kept: list[float]) -> None:
        heap = self.kept[j]
        for v in kept:
            heapq.heappush(heap, v)
        self.counts[j] += len(kept)
        if self.counts[j] > self.max_per_set:
            while len(heap) > self.max_per_set:
                heapq.heappop(heap)
            self.thresholds[j] = heap[0]

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


def test_time_rows(pipeline: str, cfg: Any, sources: dict[str, str]) -> list[Setting]:
    """Fidelity rows of the test-time candidate rule (both originals: the adaptive budget, no fixed
    score threshold, NMS 0.3).

    Args:
        pipeline: whose rule it is.
        cfg: a config with test_topk, max_per_image, max_per_set_factor, score_thresh,
            max_per_class and nms_iou.
        sources: where the original sets each: "rule", "per_image", "per_set", "threshold", "nms".
    """
    adaptive = cfg.test_topk == "adaptive"
    per_image = cfg.max_per_image if adaptive else f"none ({cfg.max_per_class} after NMS)"
    per_set = cfg.max_per_set_factor if adaptive else "none"
    threshold = "none" if adaptive else cfg.score_thresh
    return [
        setting(pipeline, "test-time candidates", "adaptive", sources["rule"], cfg.test_topk),
        setting(
            pipeline,
            "candidates per class and image, before NMS",
            100,
            sources["per_image"],
            per_image,
        ),
        setting(
            pipeline,
            "candidates per class over the test set, per image",
            40,
            sources["per_set"],
            per_set,
        ),
        setting(pipeline, "fixed score threshold", "none", sources["threshold"], threshold),
        setting(pipeline, "NMS IoU", 0.3, sources["nms"], cfg.nms_iou),
    ]
