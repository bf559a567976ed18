"""Harness stages that run the trained pipelines on the test images: the one timing loop (used for the
main timing, the test-time variants and the proposal sweep), FLOPs and peak memory.

Timing follows docs/design.md ("Timing rules"): batch size 1, inputs and proposals already in memory,
warm-up images not counted, the device synchronized around every timed region, the pipelines
alternating image by image, every run timing the same recorded list of images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from rcnn_bench.benchmarks.config import BenchConfig
from rcnn_bench.benchmarks.harness.data import TestSet
from rcnn_bench.benchmarks.machine.canary import Canary
from rcnn_bench.benchmarks.machine.memory import allocation_peak
from rcnn_bench.benchmarks.machine.roofline import CostTimer
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.parts.detections import Detections
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.progress import progress
from rcnn_bench.pipelines.runtime.timing import StageTimer, arithmetic, device_clock
from torch import Tensor

__all__ = [
    "PassResult",
    "TimingPlan",
    "alone_times",
    "count_costs",
    "plan_timing",
    "proposal_sweep",
    "sweep_boxes",
    "time_group_pass",
    "time_pass",
]

# (pipeline name, image index) -> the proposals that pipeline is given for that image.
BoxesFor = Callable[[str, int], Tensor | None]


@dataclass(frozen=True)
class TimingPlan:
    """Which test images warm up and which are timed (indices into the test split).

    Attributes:
        warmup: run once before timing, not counted.
        timed: timed, in order; the same list for the main pass and every variant.
        repeats: times each timed image is run; its figure is the median of these.
        precision: what the passes run in (pipelines.timing.arithmetic).
        warm_each: run each timed image once, untimed, before its timed runs.
    """

    warmup: tuple[int, ...]
    timed: tuple[int, ...]
    repeats: int = 1
    precision: str = "fp32"
    warm_each: bool = False


@dataclass
class PassResult:
    """One pipeline's share of a timing pass.

    Attributes:
        samples_ms: per timed image (in ``plan.timed`` order), the median over the repeats.
        stages_ms: per timed image, ms per stage (of the repeat whose total was the median).
        detections: per image of the pass, its detections.
        shared_pass: the variants the pass ran together (``Detector.variant_groups``), this one
            among them; each one's time is what it would cost alone (``alone_times``).
    """

    samples_ms: list[float] = field(default_factory=list)
    stages_ms: list[dict[str, float]] = field(default_factory=list)
    detections: list[Detections] = field(default_factory=list)
    shared_pass: tuple[str | None, ...] = (None,)

    def mean_stages(self) -> dict[str, float]:
        """Mean ms of each stage over the timed images (a stage an image skipped counts as 0)."""
        names = sorted({k for stages in self.stages_ms for k in stages})
        return {k: float(np.mean([s.get(k, 0.0) for s in self.stages_ms])) for k in names}


def plan_timing(bench: BenchConfig, n_test: int) -> TimingPlan:
    """The warm-up and timed images of a split of ``n_test`` images.

    Raises:
        ValueError: no image is left to time after the warm-up.
    """
    if bench.warmup_images >= n_test:
        raise ValueError(
            f"bench.warmup_images: {bench.warmup_images} warm-up images leave none of the "
            f"{n_test} test images to time; lower it"
        )
    warmup = tuple(range(bench.warmup_images))
    timed = tuple(range(len(warmup), n_test))
    if bench.timed_images > len(timed):
        raise ValueError(
            f"bench.timed_images: {bench.timed_images} asked for, but the test split has "
            f"{n_test} images of which {bench.warmup_images} warm up; set it to at most "
            f"{len(timed)} (0: all)"
        )
    if bench.timed_images:
        timed = timed[: bench.timed_images]
    return TimingPlan(warmup, timed, bench.repeats, bench.precision, bench.warm_each_image)


def _timed_detect(
    det: Detector,
    image: Tensor,
    boxes: Tensor | None,
    device: torch.device,
    variant: str | None,
    precision: str,
) -> tuple[Detections, float, dict[str, float]]:
    """One detection, its wall time (ms) and its stage times (ms)."""
    timer = StageTimer(device)
    with arithmetic(device, precision), device_clock(device) as took:  # setting it is not timed
        dets = det.detect(image, boxes, timer, variant)
    return dets, took[0] * 1000, {k: v * 1000 for k, v in timer.seconds.items()}


def alone_times(
    wall_s: float, shared_s: dict[str, float], own_s: dict[str | None, dict[str, float]]
) -> dict[str | None, tuple[float, dict[str, float]]]:
    """Per variant of a group detection, what it would cost alone: its time (ms), the group call's
    wall time less the other variants' own stages, and its stages (ms), the shared ones (measured
    once for the group) and its own.

    Args:
        wall_s: the whole group call, seconds.
        shared_s: the stages run once for the group, seconds.
        own_s: per variant, the stages it ran alone, seconds.
    """
    out = {}
    for v, own in own_s.items():
        others = sum(sum(s.values()) for u, s in own_s.items() if u != v)
        stages = dict(shared_s)
        for name, seconds in own.items():
            stages[name] = stages.get(name, 0.0) + seconds
        out[v] = ((wall_s - others) * 1000, {k: t * 1000 for k, t in stages.items()})
    return out


def _timed_group(
    det: Detector,
    image: Tensor,
    boxes: Tensor | None,
    device: torch.device,
    group: tuple[str | None, ...],
    precision: str,
) -> dict[str | None, tuple[Detections, float, dict[str, float]]]:
    """Per variant of ``group``, its detections, time (ms) and stage times (ms): a group of one
    through ``detect`` (``_timed_detect``), a larger one in one ``detect_group`` call, each variant
    timed as if alone (``alone_times``)."""
    if len(group) == 1:
        return {group[0]: _timed_detect(det, image, boxes, device, group[0], precision)}
    shared, own = StageTimer(device), {v: StageTimer(device) for v in group}
    with arithmetic(device, precision), device_clock(device) as took:
        found = det.detect_group(image, boxes, shared, own)
    alone = alone_times(took[0], shared.seconds, {v: t.seconds for v, t in own.items()})
    return {v: (found[v], *alone[v]) for v in group}


def _median_run(det, image, boxes, device, group, repeats, precision, warm):
    """Per variant of ``group``, the detections of the first run, and the time and stages of the
    median of ``repeats`` timed runs (each variant's median of its own times). With ``warm`` one more
    run comes first and its time is dropped: an input size's first-call costs (cuDNN and cuBLAS
    plans, oneDNN primitives) then fall on no pipeline's timed runs, whichever pipeline met that size
    first."""
    state = det.pass_state()  # a repeat must not count the image twice in the pass's budgets
    runs = []
    for k in range(repeats + int(warm)):
        if k:
            det.restore_pass_state(state)
        runs.append(_timed_group(det, image, boxes, device, group, precision))
    out = {}
    for v in group:
        ordered = sorted((run[v] for run in runs[int(warm) :]), key=lambda r: r[1])
        median = ordered[(len(ordered) - 1) // 2]
        out[v] = (runs[0][v][0], median[1], median[2])
    return out


def time_pass(
    detectors: dict[str, Detector],
    test: TestSet,
    boxes_for: BoxesFor,
    plan: TimingPlan,
    device: torch.device,
    images: tuple[int, ...] | None = None,
    variant: str | None = None,
    desc: str = "inference",
    canary: Canary | None = None,
) -> dict[str, PassResult]:
    """``time_group_pass`` of one variant (``variant``: the one every pipeline of the pass runs):
    per pipeline, its result."""
    passes = time_group_pass(
        detectors, test, boxes_for, plan, device, images, (variant,), desc, canary
    )
    return {name: result[variant] for name, result in passes.items()}


def time_group_pass(
    detectors: dict[str, Detector],
    test: TestSet,
    boxes_for: BoxesFor,
    plan: TimingPlan,
    device: torch.device,
    images: tuple[int, ...] | None = None,
    group: tuple[str | None, ...] = (None,),
    desc: str = "inference",
    canary: Canary | None = None,
) -> dict[str, dict[str | None, PassResult]]:
    """Run every pipeline on ``images`` (default: the whole split), alternating their order image by
    image, after the plan's warm-up; time the images of ``plan.timed``. Each pipeline runs the
    variants of ``group`` together (one of its ``variant_groups``; a group of one: ``detect``).

    Under torchrun each process runs every world_size-th image (after its own warm-up) and the
    shares are gathered on every process in image order: each image is timed on the one device
    that ran it, and the detections, the adaptive budgets' final thresholds included, are one
    process's.

    Args:
        detectors: the pipelines of this pass.
        test: the test split in memory.
        boxes_for: the proposals each pipeline gets for each image.
        plan: the warm-up and timed images.
        device: where they run (synchronized around each detection).
        images: the images to run (their detections are kept); None: every test image.
        group: the test-time variants every pipeline of the pass runs (None: the default model).
        desc: the progress bar's label.
        canary: timed after the pipelines on each timed image (the median of ``plan.repeats``
            runs); its ms per timed image, in ``plan.timed`` order, go to ``canary.samples_ms``.

    Returns:
        per pipeline, per variant of ``group``, its share of the pass.
    """
    order = list(detectors.items())
    for i in plan.warmup:
        for name, det in order:
            _timed_group(det, test.images[i], boxes_for(name, i), device, group, plan.precision)
    timed = set(plan.timed)
    indices = range(len(test.images)) if images is None else images
    for det in detectors.values():  # a pipeline's per-pass state (the originals' candidate budget)
        det.start_pass(len(indices), group)
    runs: dict[str, dict[int, dict]] = {name: {} for name in detectors}
    canary_ms: dict[int, float] = {}
    mine = [indices[k] for k in distributed.share(len(indices))]
    for step, i in enumerate(progress(mine, desc, "img")):
        for name, det in order if step % 2 == 0 else order[::-1]:
            repeats = plan.repeats if i in timed else 1
            image, boxes = test.images[i], boxes_for(name, i)
            warm = plan.warm_each and i in timed
            runs[name][i] = _median_run(
                det, image, boxes, device, group, repeats, plan.precision, warm
            )
        if canary is not None and i in timed:
            canary_ms[i] = canary.time_ms(plan.repeats)
    states = {name: det.pass_state() for name, det in detectors.items()}
    shares = distributed.gather((runs, states, canary_ms))
    if canary is not None:
        done_canary = {i: ms for _, _, share in shares for i, ms in share.items()}
        canary.samples_ms = [done_canary[i] for i in indices if i in timed]
    out = {name: {v: PassResult(shared_pass=group) for v in group} for name in detectors}
    for name, det in detectors.items():
        done = {i: run for share_runs, _, _ in shares for i, run in share_runs[name].items()}
        det.join_pass_states([share_states[name] for _, share_states, _ in shares])
        for v, result in out[name].items():
            for i in indices:
                result.detections.append(done[i][v][0])
                if i in timed:
                    result.samples_ms.append(done[i][v][1])
                    result.stages_ms.append(done[i][v][2])
            result.detections = det.finish_pass(result.detections, v)
    return out


def sweep_boxes(boxes: np.ndarray, n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """Exactly ``n`` proposals for the sweep: the first n, or all of them padded with jittered copies
    (each shifted and scaled by up to 10% and clipped to the image) when there are fewer."""
    if len(boxes) >= n:
        return boxes[:n]
    rng = np.random.default_rng(seed)
    extra = boxes[rng.integers(0, len(boxes), size=n - len(boxes))].copy()
    wh = extra[:, 2:] - extra[:, :2]
    extra += np.concatenate((wh, wh), axis=1) * rng.uniform(-0.1, 0.1, size=extra.shape)
    h, w = size
    extra = np.clip(extra, 0, [w, h, w, h])
    extra[:, 2:] = np.maximum(extra[:, 2:], extra[:, :2] + 1)
    return np.concatenate((boxes, extra.astype(np.float32)))


def proposal_sweep(
    detectors: dict[str, Detector],
    test: TestSet,
    plan: TimingPlan,
    bench: BenchConfig,
    device: torch.device,
) -> dict:
    """Median ms per image of each pipeline at each proposal count of ``bench.sweep_proposals``, on
    the first ``bench.sweep_images`` timed images. A pipeline that owns its proposals is timed as is.

    Returns:
        {"proposals": [...], "images": n, "ms": {pipeline: [median ms per point]}}.
    """
    images = plan.timed[: bench.sweep_images]
    sweep_plan = dataclasses.replace(plan, warmup=(), timed=images)
    ms: dict[str, list[float]] = {name: [] for name in detectors}
    uses_shared = any(not det.owns_proposals for det in detectors.values())
    for n in bench.sweep_proposals:
        boxes = {i: _sweep_point(test, i, n, bench.seed, device) for i in images if uses_shared}
        passes = time_pass(
            detectors,
            test,
            lambda name, i, b=boxes: None if detectors[name].owns_proposals else b[i],
            sweep_plan,
            device,
            images=images,
            desc=f"sweep {n} proposals",
        )
        for name, result in passes.items():
            ms[name].append(float(np.median(result.samples_ms)))
    return {"proposals": list(bench.sweep_proposals), "images": len(images), "ms": ms}


def _sweep_point(test: TestSet, i: int, n: int, seed: int, device: torch.device) -> Tensor:
    """Image i's shared proposals, cut or padded to exactly ``n``."""
    size = tuple(test.images[i].shape[:2])
    return torch.from_numpy(sweep_boxes(test.boxes[i].cpu().numpy(), n, size, seed + i)).to(device)


def count_costs(
    det: Detector,
    image: Tensor,
    boxes: Tensor | None,
    device: torch.device,
    variant: str | None = None,
) -> dict[str, int | str | dict]:
    """FLOPs (torch's FLOP counter) and estimated bytes moved of one detection, per stage and in
    all, and the peak memory it holds.

    Returns:
        {"flops", "stage_flops", "stage_bytes", "peak_memory_bytes", "peak_memory_method"}.
    """
    timer = CostTimer(device)
    det.detect(image, boxes, timer, variant)
    run = lambda: det.detect(image, boxes, StageTimer(device), variant)  # noqa: E731
    peak, method = allocation_peak(run, device)
    return {
        "flops": sum(timer.flops.values()),
        "stage_flops": timer.flops,
        "stage_bytes": timer.bytes,
        "peak_memory_bytes": int(peak),
        "peak_memory_method": method,
    }
