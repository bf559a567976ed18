"""The Detector interface the harness times: what a pipeline declares, builds, trains and detects with.

Shapes: R proposals, K object classes (labels 1..K, background 0).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

from rcnn_bench.pipelines.context import BuildContext, PaperFigures
from rcnn_bench.pipelines.originals import Table
from rcnn_bench.pipelines.parts.detections import Detections, TrainData
from rcnn_bench.pipelines.parts.floors import ObjectFloor
from rcnn_bench.pipelines.parts.scoring import ScoreBudget
from rcnn_bench.pipelines.runtime.timing import StageTimer
from torch import Tensor, nn

__all__ = ["SHARED_STAGE", "Detector"]

# A variant's training stage ("<variant>/shared_extraction") that holds the seconds of another model's
# stage whose output it reused (R-CNN's layers kept from one extraction): part of what the variant
# would cost alone, not work the run does again (a dry run's estimate leaves it out).
SHARED_STAGE = "shared_extraction"


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
    is not the default model's (a variant that reuses another model's work records its seconds as
    its SHARED_STAGE); ``detect`` records its inference stages.

    A test pass (every test image once, scored together) is bracketed by ``start_pass`` and
    ``finish_pass``: with the originals' adaptive candidate budget (``test_topk`` "adaptive" in the
    config) ``detect`` updates per-class thresholds image by image and ``finish_pass`` applies the
    final ones; without it both are no-ops. A pass may run several variants together
    (``variant_groups``, ``detect_group``): each has a budget of its own, as in a pass of its own.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    config_class: ClassVar[type]
    owns_proposals: ClassVar[bool] = False
    variants: ClassVar[tuple[str, ...]] = ()
    train_stages: ClassVar[tuple[str, ...]] = ()
    fixed_stages: ClassVar[tuple[str, ...]] = ()  # training stages that take as long on any data
    paper: ClassVar[PaperFigures | None] = None
    originals: ClassVar[Table | None] = None  # the original's settings (pipelines.originals)
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
        self.train_seed = context.seed  # added to every seed of ``cfg`` (BuildContext.seed)
        # The running test pass's budget of each of its variants, in "adaptive" test_topk.
        self._budgets: dict[str | None, ScoreBudget] = {}
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

    def object_floor(self) -> ObjectFloor | None:
        """The smallest object this pipeline resolves (see ObjectFloor); None: no such floor."""
        return None

    def model_size(self, variant: str | None = None) -> dict[str, int]:
        """Parameters and bytes of the model actually run at test time in ``variant``."""
        params = {id(p): p for m in self.test_modules(variant) for p in m.parameters()}
        tensors = list(params.values()) + self.test_tensors(variant)
        return {
            "params": sum(t.numel() for t in tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
        }

    def start_pass(self, num_images: int, variants: tuple[str | None, ...] = (None,)) -> None:
        """A test pass over ``num_images`` images begins, running ``variants`` (None: the default
        model): with ``test_topk`` "adaptive" in the config, each variant gets for each class an empty
        budget of ``max_per_set_factor * num_images`` candidates and a threshold of -inf; otherwise
        nothing."""
        if getattr(self.cfg, "test_topk", "fixed") == "adaptive":
            cfg = self.cfg
            budget = cfg.max_per_set_factor * num_images
            self._budgets = {
                v: ScoreBudget(self.num_classes, cfg.max_per_image, budget) for v in variants
            }

    def finish_pass(
        self, detections: list[Detections], variant: str | None = None
    ) -> list[Detections]:
        """``variant``'s share of the pass is over: its detections (one per image, in the pass's
        order) pruned to its final per-class thresholds in "adaptive" test_topk, unchanged otherwise.
        The pass ends with its last variant."""
        budget = self._budgets.pop(variant, None)
        if budget is None:
            return detections
        return budget.prune(detections, self.keeps_threshold_ties)

    def pass_state(self) -> dict[str | None, ScoreBudget] | None:
        """A copy of the running pass's budgets, per variant (None outside a pass or in "fixed"
        test_topk)."""
        return {v: b.copy() for v, b in self._budgets.items()} or None

    def restore_pass_state(self, state: dict[str | None, ScoreBudget] | None) -> None:
        """Put back a state from ``pass_state``: a repeated run of an image then counts once."""
        self._budgets = {v: b.copy() for v, b in (state or {}).items()}

    def join_pass_states(self, states: list[dict[str | None, ScoreBudget] | None]) -> None:
        """The pass ran as disjoint shares of its images, one per process, each begun with
        ``start_pass`` of the whole pass: each variant's state becomes that of one pass over all the
        images (ScoreBudget.merge), so that ``finish_pass`` prunes as one process would."""
        if states[0] is None:
            self._budgets = {}
            return
        self._budgets = {v: ScoreBudget.merge([s[v] for s in states]) for v in states[0]}

    def test_budget(self, variant: str | None = None) -> ScoreBudget | None:
        """What ``detect`` chooses ``variant``'s candidates with: None in "fixed" test_topk; in
        "adaptive", its budget in the running pass, or outside a pass one that records nothing (the
        image is treated as a pass's first: at most ``max_per_image`` per class, no threshold).

        Raises:
            ValueError: a pass is running that does not run ``variant``.
        """
        if getattr(self.cfg, "test_topk", "fixed") != "adaptive":
            return None
        if not self._budgets:
            return ScoreBudget(self.num_classes, self.cfg.max_per_image, None)
        if variant not in self._budgets:
            raise ValueError(f"{self.name}: the running test pass does not run variant {variant!r}")
        return self._budgets[variant]

    def training_split(self, data: TrainData) -> TrainData:
        """``data`` as this pipeline trains on it: difficult objects are training targets when its
        block's ``use_difficult`` is true (R-CNN, Fast R-CNN and SPPnet train on them,
        py-faster-rcnn does not: docs/design.md), not where the block has no such setting."""
        return dataclasses.replace(data, train_difficult=getattr(self.cfg, "use_difficult", False))

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
        if self._nothing_to_score((variant,), proposals):
            return Detections.empty()
        return self._detect(image, proposals, timer, variant)

    def _nothing_to_score(self, variants: tuple[str | None, ...], proposals: Tensor | None) -> bool:
        """What ``detect`` and ``detect_group`` check first: whether the image has no region to
        score (no shared proposals for a pipeline that uses them).

        Raises:
            ValueError: one of ``variants`` is not one of this pipeline's.
        """
        for variant in variants:
            if variant not in (None, *self.offered_variants(self.cfg)):
                raise ValueError(f"{self.name} has no test-time variant {variant!r}")
        return not self.owns_proposals and (proposals is None or proposals.shape[0] == 0)

    @abc.abstractmethod
    def _detect(
        self, image: Tensor, proposals: Tensor | None, timer: StageTimer, variant: str | None
    ) -> Detections:
        """``detect`` for a valid variant and, unless the pipeline owns its proposals, at least one
        proposal."""

    def variant_groups(self, variants: tuple[str | None, ...]) -> list[tuple[str | None, ...]]:
        """``variants`` split into the groups that one test pass runs together (``detect_group``):
        variants whose detections start from the same computed features. The default: each alone."""
        return [(v,) for v in variants]

    def detect_group(
        self,
        image: Tensor,
        proposals: Tensor | None,
        shared: StageTimer,
        timers: dict[str | None, StageTimer],
    ) -> dict[str | None, Detections]:
        """Detect objects in one image with every variant of one group (``variant_groups``): the
        keys of ``timers``. Per variant, the same detections as ``detect``.

        Args:
            image, proposals: as ``detect``'s.
            shared: receives the stages run once for the whole group (what its variants share).
            timers: per variant, receives the stages it runs alone (its own head).
        """
        if self._nothing_to_score(tuple(timers), proposals):
            return {v: Detections.empty() for v in timers}
        return self._detect_group(image, proposals, shared, timers)

    def _detect_group(
        self,
        image: Tensor,
        proposals: Tensor | None,
        shared: StageTimer,
        timers: dict[str | None, StageTimer],
    ) -> dict[str | None, Detections]:
        """``detect_group`` for valid variants and, unless the pipeline owns its proposals, at least
        one proposal. The default shares nothing: each variant's ``_detect`` in turn."""
        return {v: self._detect(image, proposals, timer, v) for v, timer in timers.items()}

    @abc.abstractmethod
    def paper_schedule(self, stages_s: dict[str, float]) -> dict:
        """Training hours extrapolated to the paper's iteration count, from measured stage times:
        {"iterations_run", "paper_iterations", "hours"}."""
