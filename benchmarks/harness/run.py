"""`rcnn-bench run`: one benchmark run as a short sequence of stages, each with its inputs and outputs.

    load data -> shared proposals -> build pipelines -> train each -> time each (one loop: the main
    timing, the test-time variants, the proposal sweep) -> FLOPs and memory -> score -> speedups ->
    assemble results -> write the run folder -> render the report

It knows the pipelines only through pipelines.detector.Detector and the registry: nothing here names
one. Only the command line imports this module.

Under torchrun every process runs these stages: rank 0 makes the data and the proposals first and the
others read its caches; training is data-parallel and the timing passes shard the test images
(pipelines.distributed); then rank 0 alone counts the costs, scores, writes the run folder and the
report, and the others return.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import yaml
from rcnn_bench.benchmarks.config import BenchConfig, RunConfig, to_dict
from rcnn_bench.benchmarks.evaluation.coco import coco_metrics
from rcnn_bench.benchmarks.evaluation.seeds import (
    ranking_lines,
    read_seed_spread,
    summarize_seeds,
)
from rcnn_bench.benchmarks.evaluation.stats import bootstrap_ratio, paired_ratio, summarize
from rcnn_bench.benchmarks.evaluation.voc import VOCEvaluator
from rcnn_bench.benchmarks.harness.data import (
    Splits,
    TestSet,
    load_splits,
    load_test_set,
    load_train_set,
    object_floors,
    shared_proposals,
    size_warnings,
)
from rcnn_bench.benchmarks.harness.inference import (
    PassResult,
    TimingPlan,
    count_costs,
    plan_timing,
    proposal_sweep,
    time_group_pass,
    time_pass,
)
from rcnn_bench.benchmarks.harness.preflight import (
    check_disk,
    check_output,
    check_splits,
    clean_leftovers,
)
from rcnn_bench.benchmarks.harness.pretrain import initial_backbone
from rcnn_bench.benchmarks.machine.canary import Canary
from rcnn_bench.benchmarks.machine.env import LoadSampler, environment, seeded, setup
from rcnn_bench.benchmarks.machine.memory import PeakMemory
from rcnn_bench.benchmarks.machine.roofline import machine_peaks, stage_efficiency, with_reference
from rcnn_bench.benchmarks.reporting import tables
from rcnn_bench.benchmarks.reporting.fidelity import fidelity_rows
from rcnn_bench.benchmarks.reporting.report import render_results
from rcnn_bench.benchmarks.reporting.results import (
    SCHEMA_VERSION,
    append_history,
    validate,
    write_json,
)
from rcnn_bench.datasets.describe import describe
from rcnn_bench.pipelines import registry
from rcnn_bench.pipelines.context import BuildContext
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.parts.backbones import Backbone, build_backbone, clone, in_format
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.parts.proposals import ProposalConfig, ProposalSet, time_search
from rcnn_bench.pipelines.parts.training import Diverged, recording_curves
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.progress import log, progress
from rcnn_bench.pipelines.runtime.timing import StageTimer, channels_last_on

__all__ = ["run"]


def run(cfg: RunConfig, config_path: str | None = None) -> Path | None:
    """One benchmark run. Returns the run folder (results.json inside); None on a process other
    than rank 0 under torchrun."""
    started, lap = time.perf_counter(), Laps()
    device, peaks = prepare_machine(cfg)
    calibrated = read_seed_spread(cfg.bench.seed_spread)
    splits, plan, backbone = prepare_data(cfg)
    lap("setup and data")
    proposals = make_proposals(cfg, splits)
    lap("proposals")
    channels_last = channels_last_on(cfg.bench.channels_last, device)
    backbone, pretraining = initial_backbone(
        cfg.backbone, Path(cfg.cache_dir), device, channels_last
    )
    if pretraining:
        log(pretrain_line(pretraining))
    lap("pre-training")
    seeds = cfg.training_seeds  # the first seed's models are timed
    detectors = build_pipelines(cfg, backbone, splits.train.num_classes, device, seeds[0])
    floors = object_floors(detectors)
    for line in size_warnings(splits, floors):
        log(f"warning: {line}")
    train = load_train_set(splits, proposals)
    with LoadSampler() as training_load:
        training = train_pipelines(detectors, train, device, seeds[0])
    lap("training")
    prepare_test(detectors, channels_last)
    test = load_test_set(splits, proposals, device)
    with LoadSampler() as timing_load:
        search_s = time_search(splits.test, plan.timed, cfg.proposals) if proposals else None
        lap("selective search timed")
        canary = Canary(device, plan.precision)
        main = time_pass(detectors, test, _boxes_for(detectors, test), plan, device, canary=canary)
        lap("test pass")
        variants = time_variants(detectors, test, plan, device)
        lap("variant passes")
        sweep = proposal_sweep(detectors, test, plan, cfg.bench, device)
        lap("proposal sweep")
    more = train_more_seeds(cfg, backbone, train, test, plan, device)
    lap("more seeds")
    if not distributed.is_main():
        return None
    costs = {n: _costs(detectors[n], test, plan, device) for n in progress(detectors, "FLOPs")}
    lap("FLOPs and memory")
    search_ms = 1000 * float(np.mean(search_s)) if search_s is not None else 0.0
    records = pipeline_records(detectors, training, main, variants, costs, splits, search_ms, peaks)
    speedups = compute_speedups(records, cfg.bench)
    shown = examples(cfg.bench, splits, main)
    spread = {**seed_block(seeds, records, training, more, splits), "calibrated": calibrated}
    load = hygiene(training_load, timing_load, cfg.bench.busy_share)
    lap("evaluation")
    results = assemble(
        cfg, config_path, device, splits, proposals, floors, plan, backbone, peaks, pretraining,
        records, speedups, sweep, shown, spread, load, canary.samples_ms, lap.seconds, started,
    )  # fmt: skip
    test_proposals = proposals[splits.test.split] if proposals else None
    results["proposals"].update(_search_record(test_proposals, search_s))
    run_dir = write_run_folder(results, Path(cfg.output_dir))
    render_results([results], run_dir.parent / "history.jsonl", run_dir)
    print(tables.summary(results))
    labels = {name: rec["label"] for name, rec in records.items()}
    print("\n".join(ranking_lines(results["seeds"], labels)))
    spent = ", ".join(f"{name} {s:.0f}" for name, s in lap.seconds.items() if s >= 0.5)
    log(
        f"wrote {run_dir / 'results.json'} ({results['wall_s']:.0f} s: {spent}; report "
        f"{time.perf_counter() - started - results['wall_s']:.0f})"
    )
    return run_dir


def prepare_machine(cfg: RunConfig) -> tuple[torch.device, dict]:
    """The process set up for the run (``setup``) and the machine's peak rates, logged.

    Returns:
        (the device, machine_peaks with the reference device's figures for ``bench.precision``).
    """
    device = setup(cfg)
    peaks = with_reference(machine_peaks(device), cfg.bench.precision)
    log(
        f"{device}: matrix multiply {peaks['compute_gflops']:.0f} GFLOP/s "
        f"({peaks['compute_kind']}), memory {peaks['bandwidth_gbs']:.1f} GB/s; test-time "
        f"precision {cfg.bench.precision}"
        f"{', channels-last' if channels_last_on(cfg.bench.channels_last, device) else ''}"
    )
    return device, peaks


def prepare_data(cfg: RunConfig) -> tuple[Splits, TimingPlan, Backbone]:
    """The folders checked (and a dead run's leftovers removed), the dataset's two splits, the
    timing plan over the test split, and the initial backbone; the disk checked for the caches.

    Raises:
        ValueError: a folder, the data or the disk cannot serve the run (the message names it).
    """
    check_output(cfg.output_dir, cfg.cache_dir)
    clean_leftovers(cfg.output_dir, cfg.cache_dir)
    splits = distributed.main_first(lambda: load_splits(cfg.data))
    check_splits(splits)
    plan = plan_timing(cfg.bench, len(splits.test))
    backbone = build_backbone(cfg.backbone)
    check_disk(cfg, splits, [registry.get(name) for name in cfg.pipelines], backbone)
    return splits, plan, backbone


def make_proposals(cfg: RunConfig, splits: Splits) -> dict[str, ProposalSet] | None:
    """The shared selective-search proposals of both splits (rank 0 makes them, the others read its
    cache); None when every configured pipeline makes its own."""
    if all(registry.get(name).owns_proposals for name in cfg.pipelines):
        return None
    workers = cfg.proposal_workers
    return distributed.main_first(
        lambda: shared_proposals(cfg.proposals, cfg.cache_dir, workers, splits)
    )


class Laps:
    """Wall seconds of a run's phases, each counted from the end of the one before."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def pretrain_line(record: dict) -> str:
    """The console's line about the shared pre-trained weights."""
    how = "read from the cache" if record["cached"] else "trained"
    return (
        f"backbone pre-training (the stand-in for ImageNet): {how}, {record['file']} "
        f"({record['iters']} iterations, {record['seconds']:.0f} s when trained, held-out accuracy "
        f"{record['held_out_accuracy']:.3f})"
    )


def weights_sha1(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers: the record that every pipeline starts from the
    same initial weights."""
    digest = hashlib.sha1()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_pipelines(
    cfg: RunConfig, backbone: Backbone, num_classes: int, device: torch.device, seed: int
) -> dict[str, Detector]:
    """Every configured pipeline, each built from its config block on its own copy of ``backbone``
    under the training seed ``seed`` (BuildContext.seed), inside its own seeded stream (``seed`` and
    "<name> build"): a pipeline's initial heads depend on neither the other pipelines of the config,
    nor their order, nor what drew from torch's global stream before (the machine probe).

    Raises:
        RuntimeError: a pipeline changed the shared weights while it was built.
    """
    before = weights_sha1(backbone)
    channels_last = channels_last_on(cfg.bench.channels_last, device)
    context = BuildContext(
        num_classes=num_classes,
        device=device,
        backbone=lambda: in_format(clone(backbone), channels_last),
        cache_dir=Path(cfg.cache_dir),
        seed=seed,
    )
    detectors = {}
    for name, block in cfg.pipelines.items():
        with seeded(seed, f"{name} build"):
            detectors[name] = registry.get(name)(block, context)
    if weights_sha1(backbone) != before:
        raise RuntimeError("a pipeline changed the shared initial weights while it was built")
    return detectors


def prepare_test(detectors: dict[str, Detector], channels_last: bool) -> None:
    """Every network a pipeline runs at test time (each enabled variant's too) in the run's memory
    format (``bench.channels_last``), its own layers beside the shared backbone's included; the
    inputs follow the weights' format."""
    for det in detectors.values():
        for variant in (None, *det.enabled_variants()):
            for module in det.test_modules(variant):
                in_format(module, channels_last)


def train_pipelines(
    detectors: dict[str, Detector], train: TrainData, device: torch.device, seed: int
) -> dict[str, dict]:
    """Train each pipeline in turn, then what its enabled variants need beyond it; per pipeline the
    default model's stage times (the variants' are kept apart, "<variant>/<stage>", and count in
    neither ``total_s`` nor the paper-schedule hours), peak memory, what ``fit`` reported and its
    SGD curves (pipelines.parts.training.recording_curves)."""
    out = {}
    world = distributed.world_size()
    for name, det in detectors.items():
        log(f"training {name}" + (f" on {world} processes" if world > 1 else ""))
        timer, variant_timer = StageTimer(device), StageTimer(device)
        try:
            with PeakMemory(device) as mem, seeded(seed, name), recording_curves() as curves:
                info = det.fit(det.training_split(train), timer)
            with seeded(seed, f"{name} variants"):
                variant_info = det.fit_variants(det.training_split(train), variant_timer)
        except Diverged as err:
            raise Diverged(f"pipelines.{name}.solver (training seed {seed}): {err}") from None
        stages = dict(timer.seconds)
        out[name] = {
            "stages_s": stages,
            "total_s": sum(stages.values()),
            "paper_schedule": det.paper_schedule(stages),
            "peak_memory_bytes": mem.peak_bytes,
            "peak_memory_method": mem.method,
            "info": info,
            "variant_stages_s": dict(variant_timer.seconds),
            "variant_info": variant_info,
            "curves": curves,
        }
    return out


def train_more_seeds(
    cfg: RunConfig,
    backbone: Backbone,
    train: TrainData,
    test: TestSet,
    plan: TimingPlan,
    device: torch.device,
) -> dict[int, tuple[dict[str, dict], dict[str, PassResult]]]:
    """Every pipeline built, trained and run on the test images again under each training seed after
    the first (``bench.seeds``), on the same data, proposals and pre-trained weights; one seed's
    models at a time, dropped once they have detected. Their detection pass is the main pass's
    loop once per image, unwarmed: its times are not kept (the first seed's models are the ones timed).

    Returns:
        {seed: (train_pipelines' record, {pipeline: its pass over the test images})}.
    """
    out = {}
    once = dataclasses.replace(plan, repeats=1, warm_each=False)
    for seed in cfg.training_seeds[1:]:
        log(f"training seed {seed} ({', '.join(map(str, cfg.training_seeds))})")
        detectors = build_pipelines(cfg, backbone, train.num_classes, device, seed)
        training = train_pipelines(detectors, train, device, seed)
        boxes = _boxes_for(detectors, test)
        out[seed] = training, time_pass(detectors, test, boxes, once, device, desc=f"seed {seed}")
    return out


def seed_block(
    seeds: tuple[int, ...],
    records: dict[str, dict],
    training: dict[str, dict],
    more: dict[int, tuple[dict[str, dict], dict[str, PassResult]]],
    splits: Splits,
) -> dict:
    """results.json's ``seeds``: each seed's VOC07 mAP, per-class AP and SGD curves per pipeline (the
    first seed's from the main pass), and their spread (evaluation.seeds.summarize_seeds)."""
    runs = {
        name: [_seed_run(seeds[0], rec["map"], training[name]["curves"])]
        for name, rec in records.items()
    }
    for seed, (seed_training, passes) in more.items():
        for name in runs:
            evaluation = _score(splits.classes, splits.test.annotations, passes[name])
            runs[name].append(_seed_run(seed, evaluation, seed_training[name]["curves"]))
    return summarize_seeds(runs)


def _seed_run(seed: int, evaluation: dict, curves: list[dict]) -> dict:
    """One pipeline's record of one training seed: its VOC07 mAP, per-class AP and SGD curves."""
    per_class = {c: v["voc07"] for c, v in evaluation["per_class"].items()}
    return {"seed": seed, "voc07": evaluation["voc07"], "per_class": per_class, "curves": curves}


def hygiene(training: LoadSampler, timing: LoadSampler, busy_share: float) -> dict:
    """The machine's load sampled throughout training and the timed passes, and a warning when
    other processes, or the hypervisor (VM steal), took more than ``busy_share`` of the CPU on
    average during either."""
    phases = {"training": training.summary(), "timing": timing.summary()}
    taken = {
        f"{kind} during {phase}": s[key]["mean"]
        for phase, s in phases.items()
        for kind, key in (("other processes", "other_cpu_share"), ("VM steal", "steal_share"))
        if s[key] is not None and s[key]["mean"] > busy_share
    }
    if taken:
        log(
            "WARNING: "
            + ", ".join(f"{what} {100 * share:.0f}% of the CPU" for what, share in taken.items())
            + " (on average): these times are not figures; re-run on a quiet machine"
        )
    return {**phases, "busy": bool(taken)}


def _boxes_for(detectors: dict[str, Detector], test: TestSet):
    """The shared proposals of image i, or None for a pipeline that makes its own."""
    return lambda name, i: None if detectors[name].owns_proposals else test.boxes[i]


def time_variants(
    detectors: dict[str, Detector],
    test: TestSet,
    plan: TimingPlan,
    device: torch.device,
) -> dict[str, dict[str, PassResult]]:
    """Each pipeline's enabled test-time variants, in one pass per group of its ``variant_groups``
    (the variants that share features run together, each timed as if alone), over the same images
    as the main pass (the same warm-up, the same timed images in the same order). Without the main
    pass's untimed run of each timed image (``bench.warm_each_image``): that pass has met every
    image's input sizes already, with the same trunk."""
    unwarmed = dataclasses.replace(plan, warm_each=False)
    out: dict[str, dict[str, PassResult]] = {}
    for name, det in detectors.items():
        out[name] = {}
        for group in det.variant_groups(det.enabled_variants()):
            one = {name: det}
            result = time_group_pass(
                one,
                test,
                _boxes_for(one, test),
                unwarmed,
                device,
                group=group,
                desc="+".join(group),
            )
            out[name].update(result[name])
    return out


def _costs(det: Detector, test: TestSet, plan: TimingPlan, device: torch.device) -> dict:
    """FLOPs and peak memory of one detection on the first timed image, and the model's size; the
    same for each enabled variant under "variants"."""
    i = plan.timed[0]
    boxes = None if det.owns_proposals else test.boxes[i]
    costs = count_costs(det, test.images[i], boxes, device)
    costs.update(det.model_size(), proposals=0 if boxes is None else int(boxes.shape[0]))
    costs["variants"] = {
        v: {**count_costs(det, test.images[i], boxes, device, v), **det.model_size(v)}
        for v in det.enabled_variants()
    }
    return costs


def _score(classes: tuple[str, ...], annotations: list, result: PassResult) -> dict:
    evaluator = VOCEvaluator(classes)
    for ann, dets in zip(annotations, result.detections, strict=True):
        evaluator.process(ann, dets)
    return evaluator.evaluate()


def _map_record(evaluation: dict) -> dict:
    """The AP figures results.json keeps from an evaluation (the PR curves are kept apart)."""
    return {k: evaluation[k] for k in ("voc07", "area", "voc07_strict", "strict_iou", "per_class")}


def _coco(classes: tuple[str, ...], annotations: list, result: PassResult) -> dict:
    """COCO's metrics of a pass (each image's 100 highest-scored detections, as the protocol)."""
    return coco_metrics(annotations, result.detections, classes)


def pipeline_records(
    detectors: dict[str, Detector],
    training: dict[str, dict],
    main: dict[str, PassResult],
    variants: dict[str, dict[str, PassResult]],
    costs: dict[str, dict],
    splits: Splits,
    proposal_ms: float,
    peaks: dict,
) -> dict[str, dict]:
    """results.json's ``pipelines`` block: per pipeline its training, timing, costs, per-stage
    efficiency against ``peaks`` (the machine's ceilings) and scores, and the same of each enabled
    variant (its training: the seconds of its own stages). End to end adds ``proposal_ms``, this
    run's selective search per image, to a pipeline that takes proposals."""
    classes, anns = splits.classes, splits.test.annotations
    out = {}
    for name, det in detectors.items():
        timing, cost = main[name], costs[name]
        median, stages = float(np.median(timing.samples_ms)), timing.mean_stages()
        evaluation = _score(classes, anns, timing)
        paper = det.paper.__dict__ if det.paper else None
        out[name] = {
            "label": det.label or name,
            "owns_proposals": det.owns_proposals,
            "stage_groups": dict(det.stage_groups),
            "paper": paper,
            "variant_papers": dict(det.variant_papers),
            "train": training[name],
            "inference": {
                "ms_per_image": summarize(timing.samples_ms),
                "samples_ms": timing.samples_ms,
                "stages_ms": stages,
                "end_to_end_ms_per_image": median + (0 if det.owns_proposals else proposal_ms),
                "flops_per_image": cost["flops"],
                "flops_image_proposals": cost["proposals"],
                "achieved_gflops_per_s": cost["flops"] / 1e9 / (median / 1000),
                "efficiency": stage_efficiency(
                    cost["stage_flops"], cost["stage_bytes"], stages, peaks
                ),
            },
            "map": {**_map_record(evaluation), "coco": _coco(classes, anns, timing)},
            "pr": evaluation["pr"],
            "variants": _variant_records(
                variants[name],
                cost["variants"],
                training[name]["variant_stages_s"],
                splits,
            ),
            "params": cost["params"],
            "model_bytes": cost["bytes"],
            "peak_memory_bytes": cost["peak_memory_bytes"],
            "peak_memory_method": cost["peak_memory_method"],
        }
    return out


def _variant_records(
    passes: dict[str, PassResult],
    costs: dict[str, dict],
    train_stages_s: dict[str, float],
    splits: Splits,
) -> dict[str, dict]:
    """One pipeline's ``variants`` block: per variant its scores, timing, FLOPs, size and training.

    Args:
        passes: per variant, its timing pass ("shared_pass": the variants timed with it).
        costs: per variant, its FLOPs and size (``_costs``'s "variants").
        train_stages_s: the variants' training stages, "<variant>/<stage>" -> seconds.
        splits: the classes and the test annotations.
    """
    classes, anns = splits.classes, splits.test.annotations
    return {
        variant: {
            "map": _map_record(_score(classes, anns, result)),
            "ms_per_image": summarize(result.samples_ms),
            "samples_ms": result.samples_ms,
            "stages_ms": result.mean_stages(),
            "flops_per_image": costs[variant]["flops"],
            "params": costs[variant]["params"],
            "model_bytes": costs[variant]["bytes"],
            "shared_pass": list(result.shared_pass),
            "train_s": sum(
                s for stage, s in train_stages_s.items() if stage.startswith(f"{variant}/")
            ),
        }
        for variant, result in passes.items()
    }


def speedup(base: dict, cand: dict, baseline: str, candidate: str, bench: BenchConfig) -> dict:
    """``baseline``'s figures over ``candidate``'s (above 1: the candidate is faster); the
    intervals' bootstrap draws as ``bench`` says."""
    b, c = base["inference"], cand["inference"]
    n, seed = bench.bootstrap_samples, bench.seed
    inference = bootstrap_ratio(b["samples_ms"], c["samples_ms"], n, seed)
    inference["paired"] = paired_ratio(b["samples_ms"], c["samples_ms"], n, seed)
    return {
        "baseline": baseline,
        "candidate": candidate,
        "train": base["train"]["total_s"] / cand["train"]["total_s"],
        "train_paper_schedule": base["train"]["paper_schedule"]["hours"]
        / cand["train"]["paper_schedule"]["hours"],
        "inference": inference,
        "end_to_end": b["end_to_end_ms_per_image"] / c["end_to_end_ms_per_image"],
        "flops": b["flops_per_image"] / max(c["flops_per_image"], 1),
    }


def compute_speedups(records: dict[str, dict], bench: BenchConfig) -> dict[str, dict]:
    """Every pipeline against ``bench.baseline``, and the extra pairs ``bench.pairs`` asks for,
    keyed "candidate/baseline"."""
    base = bench.baseline
    pairs = [(base, name) for name in records if name != base] + list(bench.pairs)
    return {
        f"{c}/{b}": speedup(records[b], records[c], b, c, bench) for b, c in dict.fromkeys(pairs)
    }


def assemble(
    cfg: RunConfig,
    config_path: str | None,
    device: torch.device,
    splits: Splits,
    proposals: dict[str, ProposalSet] | None,
    floors: dict[str, tuple],
    plan: TimingPlan,
    backbone: Backbone,
    peaks: dict,
    pretraining: dict | None,
    records: dict[str, dict],
    speedups: dict[str, dict],
    sweep: dict,
    shown: list[dict],
    spread: dict,
    load: dict,
    canary_ms: list[float],
    phases_s: dict[str, float],
    started: float,
) -> dict:
    """results.json, whole: the one place it is built (the run folder writes it as it is and the
    report renders it from memory).

    Args:
        cfg, config_path: the run's config and the file it came from (None: built in code).
        device, peaks: where it ran and the machine's ceilings (``prepare_machine``).
        splits, proposals, plan: the data, the shared proposals (None: every pipeline made its
            own) and the timing plan.
        floors: each pipeline's object floor (``object_floors``), for the data description.
        backbone, pretraining: the initial weights and their pre-training's record (or None).
        records, speedups, sweep, shown, load: what the run measured (``pipeline_records``,
            ``compute_speedups``, ``proposal_sweep``, ``examples``, ``hygiene``).
        spread: accuracy over the training seeds (``seed_block``, with the calibrated spread).
        canary_ms: the drift canary's ms per timed image of the main pass (machine.canary).
        phases_s, started: wall seconds per phase, and ``time.perf_counter()`` at the start: wall_s
            is taken last, once the rest is built (the report comes after: not in wall_s).
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": _run_id(cfg.name),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config_path": config_path,
        "config": to_dict(cfg),
        "env": {**environment(device), "world_size": distributed.world_size(), "peaks": peaks},
        "dataset": _dataset_record(splits, proposals, floors),
        "proposals": _proposal_record(cfg.proposals, splits, proposals),
        "timing": _timing_record(plan, splits.test.image_ids, load, canary_ms),
        "backbone": {
            "name": cfg.backbone.name,
            "init_weights_sha1": weights_sha1(backbone),
            "pretrain": pretraining,
        },
        "baseline": cfg.bench.baseline,
        "pipelines": records,
        "fidelity": [row.as_dict() for row in fidelity_rows(cfg)],
        "speedup": speedups,
        "sweep": sweep,
        "examples": shown,
        "seeds": spread,
        "phases_s": phases_s,
        "wall_s": time.perf_counter() - started,  # last: a dict display evaluates in order
    }


def _dataset_record(
    splits: Splits, proposals: dict[str, ProposalSet] | None, floors: dict[str, tuple]
) -> dict:
    return {
        "name": splits.train.name,
        "kind": splits.kind,
        "root": str(splits.root),
        "classes": list(splits.classes),
        "train_images": len(splits.train),
        "test_images": len(splits.test),
        "splits": [
            describe(ds, proposals[ds.split].boxes if proposals else None, floors)
            for ds in (splits.train, splits.test)
        ],
    }


def _timing_record(
    plan: TimingPlan, image_ids: list[str], load: dict, canary_ms: list[float]
) -> dict:
    return {
        "timed_images": len(plan.timed),
        "warmup_images": len(plan.warmup),
        "image_ids": [image_ids[i] for i in plan.timed],
        "repeats": plan.repeats,
        "warm_each_image": plan.warm_each,
        "alternating": True,
        "batch_size": 1,
        "load": load,
        "canary_ms": canary_ms,  # the drift canary beside each timed image (image_ids' order)
    }


def _proposal_record(cfg: ProposalConfig, splits: Splits, proposals: dict | None) -> dict:
    record = {
        "method": "selective_search" if proposals else "none (every pipeline makes its own)",
        "mode": cfg.mode,
        "max_per_image": cfg.max_proposals,
    }
    if not proposals:
        zeros = ("mean_per_image", "seconds_per_image", "recall_iou50", "recall_iou70")
        return {**record, **dict.fromkeys(zeros, 0.0)}
    return {
        **record,
        **proposals[splits.test.split].stats(splits.test),
        "train_seconds_per_image": float(np.mean(proposals[splits.train.split].seconds)),
        "sha1": {split: p.sha1() for split, p in proposals.items()},
        # The cap is this project's (the originals kept every box): how many images it cut, per split.
        "images_at_cap": {split: p.images_at(cfg.max_proposals) for split, p in proposals.items()},
    }


def _search_record(proposals: ProposalSet | None, search_s: np.ndarray | None) -> dict:
    """Where the proposals came from and where each recorded time was measured: selective search
    is timed in every run on the timed images (``timed_ms``, in the order of timing.image_ids;
    ``seconds_per_image`` is their mean), whatever the cache held."""
    if proposals is None:
        return {"source": "none"}
    made = "the cache" if proposals.from_cache else "this run"
    return {
        "source": "cache" if made == "the cache" else "computed in this run",
        "seconds_per_image": float(np.mean(search_s)),
        "seconds_measured": "this run, on the timed images",
        "timed_ms": [1000 * s for s in search_s],
        "recorded_seconds_per_image": float(np.mean(proposals.seconds)),
        "recorded_seconds_measured": f"when {made} computed them, on every image",
    }


def examples(bench: BenchConfig, splits: Splits, main: dict[str, PassResult]) -> list[dict]:
    """The first ``bench.example_images`` test images with their ground truth and each pipeline's
    top ``bench.example_detections`` detections."""
    test, k = splits.test, bench.example_detections
    out = []
    for i in range(min(bench.example_images, len(test))):
        dets = {name: result.detections[i] for name, result in main.items()}
        out.append(
            {
                "image": str(test.image_path(test.image_ids[i]).resolve()),
                "image_id": test.image_ids[i],
                "gt_boxes": test.annotations[i].boxes.tolist(),
                "gt_labels": test.annotations[i].labels.tolist(),
                "detections": {
                    name: {
                        "boxes": d.boxes[:k].tolist(),
                        "scores": d.scores[:k].tolist(),
                        "labels": d.labels[:k].tolist(),
                    }
                    for name, d in dets.items()
                },
            }
        )
    return out


def _run_id(name: str) -> str:
    """Unique even for two runs started in the same second: time, then a random suffix."""
    return f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}-{uuid.uuid4().hex[:6]}"


def write_run_folder(results: dict, output_dir: Path) -> Path:
    """Write ``results`` (validated) as results.json and its config as config.yaml into a new run
    folder under ``output_dir`` named by its run_id (built under a temporary name, then renamed, so
    that a crash leaves no half-written run), point ``latest`` at it and append the history line."""
    validate(results)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_dir = output_dir / results["run_id"]
    tmp = output_dir / f".{results['run_id']}.tmp-{os.getpid()}"  # a later run removes it if we die
    tmp.mkdir()
    (tmp / "config.yaml").write_text(yaml.safe_dump(results["config"], sort_keys=False))
    write_json(tmp / "results.json", results)
    tmp.rename(run_dir)
    _point_latest(run_dir)
    append_history(output_dir / "history.jsonl", results)
    return run_dir


def _point_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    tmp.replace(latest)
