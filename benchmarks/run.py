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

from benchmarks import tables
from benchmarks.coco_eval import coco_metrics
from benchmarks.config import RunConfig, to_dict
from benchmarks.data import (
    Splits,
    TestSet,
    load_splits,
    load_test_set,
    load_train_set,
    log,
    shared_proposals,
)
from benchmarks.env import (
    environment,
    machine_load,
    make_reproducible,
    resolve_device,
    seeded,
)
from benchmarks.evaluation import VOCEvaluator
from benchmarks.fidelity import fidelity_rows
from benchmarks.inference import (
    PassResult,
    TimingPlan,
    count_costs,
    plan_timing,
    proposal_sweep,
    time_pass,
)
from benchmarks.memory import PeakMemory, pin_allocator
from benchmarks.preflight import check_disk, check_output, check_splits, clean_leftovers
from benchmarks.pretrain import initial_backbone
from benchmarks.report import render
from benchmarks.results import SCHEMA_VERSION, append_history, validate, write_json
from benchmarks.roofline import machine_peaks, stage_efficiency, with_reference
from benchmarks.stats import bootstrap_ratio, paired_ratio, summarize
from datasets.describe import describe
from pipelines import distributed, registry
from pipelines.backbones import Backbone, build_backbone, clone
from pipelines.detector import Detector, TrainData
from pipelines.progress import progress
from pipelines.proposals import ProposalSet
from pipelines.timing import StageTimer

__all__ = ["run"]


def run(cfg: RunConfig, config_path: str | None = None) -> Path | None:
    """One benchmark run. Returns the run folder (results.json inside); None on a process other
    than rank 0 under torchrun."""
    started = time.perf_counter()
    lap = Laps()
    device = setup(cfg)
    peaks = with_reference(machine_peaks(device), cfg.bench.precision)
    log(
        f"{device}: matrix multiply {peaks['compute_gflops']:.0f} GFLOP/s "
        f"({peaks['compute_kind']}), memory {peaks['bandwidth_gbs']:.1f} GB/s; test-time "
        f"precision {cfg.bench.precision}{', channels-last' if cfg.bench.channels_last else ''}"
    )
    check_output(cfg)
    clean_leftovers(cfg)
    splits = distributed.main_first(lambda: load_splits(cfg))
    check_splits(splits)
    plan = plan_timing(cfg.bench, len(splits.test))
    classes = [registry.get(name) for name in cfg.pipelines]
    backbone = build_backbone(cfg.backbone)
    check_disk(cfg, splits, classes, backbone)
    lap("setup and data")
    proposals = None
    if not all(cls.owns_proposals for cls in classes):
        proposals = distributed.main_first(lambda: shared_proposals(cfg, splits))
    lap("proposals")
    backbone, pretraining = initial_backbone(cfg.backbone, Path(cfg.cache_dir), device)
    if pretraining:
        log(pretrain_line(pretraining))
    lap("pre-training")
    detectors = build_pipelines(cfg, backbone, splits.train.num_classes, device)
    train = load_train_set(splits, proposals, cfg.data.train_difficult)
    training = train_pipelines(detectors, train, device, cfg.seed)
    lap("training")
    prepare_test(detectors, cfg.bench.channels_last)
    test = load_test_set(splits, proposals, device)
    load_before = machine_load()
    main = time_pass(detectors, test, _boxes_for(detectors, test), plan, device)
    lap("test pass")
    variants = time_variants(detectors, test, plan, device)
    lap("variant passes")
    sweep = proposal_sweep(detectors, test, plan, cfg.bench, device)
    lap("proposal sweep")
    if not distributed.is_main():
        return None
    costs = {n: _costs(detectors[n], test, plan, device) for n in progress(detectors, "FLOPs")}
    lap("FLOPs and memory")
    records = pipeline_records(detectors, training, main, variants, costs, splits, proposals)
    add_efficiency(records, costs, peaks)
    speedups = compute_speedups(records, cfg)
    results = assemble(cfg, config_path, device, splits, proposals, plan, backbone, records)
    results["env"]["peaks"] = peaks
    results["backbone"]["pretrain"] = pretraining
    results["fidelity"] = [row.as_dict() for row in fidelity_rows(cfg)]
    results.update(speedup=speedups, sweep=sweep, examples=examples(cfg, splits, main))
    results["timing"]["load"] = hygiene(load_before, machine_load(), cfg.bench.busy_share)
    lap("evaluation")
    results["phases_s"] = lap.seconds  # the report's own rendering comes after: not in wall_s
    results["wall_s"] = time.perf_counter() - started
    run_dir = write_run_folder(results, cfg)
    render([run_dir], run_dir)
    print(tables.summary(results))
    spent = ", ".join(f"{name} {s:.0f}" for name, s in lap.seconds.items() if s >= 0.5)
    log(
        f"wrote {run_dir / 'results.json'} ({results['wall_s']:.0f} s: {spent}; report "
        f"{time.perf_counter() - started - results['wall_s']:.0f})"
    )
    return run_dir


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


def setup(cfg: RunConfig) -> torch.device:
    """Thread count, the C allocator's thresholds, device, seeds, deterministic kernels, and the
    training's arithmetic (IEEE float32 unless ``train_tf32``; each test-time pass sets its own)."""
    pin_allocator()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.init_from_env(resolve_device(cfg.device))
    make_reproducible(cfg.seed, cfg.deterministic, device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = cfg.train_tf32
    if distributed.world_size() > 1:
        log(f"process {distributed.rank()} of {distributed.world_size()} on {device}")
    return device


def weights_sha1(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers: the record that every pipeline starts from the
    same initial weights."""
    digest = hashlib.sha1()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_pipelines(
    cfg: RunConfig, backbone: Backbone, num_classes: int, device: torch.device
) -> dict[str, Detector]:
    """Every configured pipeline, each built from its config block on its own copy of ``backbone``.

    Raises:
        RuntimeError: a pipeline changed the shared weights while it was built.
    """
    before = weights_sha1(backbone)
    context = registry.BuildContext(
        num_classes=num_classes,
        device=device,
        backbone=lambda: clone(backbone),
        cache_dir=Path(cfg.cache_dir),
    )
    detectors = {name: registry.get(name)(block, context) for name, block in cfg.pipelines.items()}
    if weights_sha1(backbone) != before:
        raise RuntimeError("a pipeline changed the shared initial weights while it was built")
    return detectors


def prepare_test(detectors: dict[str, Detector], channels_last: bool) -> None:
    """With ``bench.channels_last``, every network a pipeline runs at test time (each enabled
    variant's too) in channels-last memory format; the inputs follow the weights' format."""
    if not channels_last:
        return
    for det in detectors.values():
        for variant in (None, *det.enabled_variants()):
            for module in det.test_modules(variant):
                module.to(memory_format=torch.channels_last)


def train_pipelines(
    detectors: dict[str, Detector], train: TrainData, device: torch.device, seed: int
) -> dict[str, dict]:
    """Train each pipeline in turn, then what its enabled variants need beyond it; per pipeline the
    default model's stage times (the variants' are kept apart, "<variant>/<stage>", and count in
    neither ``total_s`` nor the paper-schedule hours), peak memory and what ``fit`` reported."""
    out = {}
    world = distributed.world_size()
    for name, det in detectors.items():
        log(f"training {name}" + (f" on {world} processes" if world > 1 else ""))
        timer, variant_timer = StageTimer(device), StageTimer(device)
        with PeakMemory(device) as mem, seeded(seed, name):
            info = det.fit(train, timer)
        with seeded(seed, f"{name} variants"):
            variant_info = det.fit_variants(train, variant_timer)
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
        }
    return out


def hygiene(before: dict, after: dict, busy_share: float) -> dict:
    """The machine's load around the timing, and a warning when other processes were busy."""
    shares = [m["other_cpu_share"] for m in (before, after) if m["other_cpu_share"] is not None]
    busy = bool(shares) and max(shares) > busy_share
    if busy:
        log(
            f"WARNING: other processes used {100 * max(shares):.0f}% of the CPU around the timing "
            "(load average "
            f"{before['load_1min']:.2f} before, {after['load_1min']:.2f} after): these times are "
            "not figures; re-run on a quiet machine"
        )
    return {"before": before, "after": after, "busy": busy}


def _boxes_for(detectors: dict[str, Detector], test: TestSet):
    """The shared proposals of image i, or None for a pipeline that makes its own."""
    return lambda name, i: None if detectors[name].owns_proposals else test.boxes[i]


def time_variants(
    detectors: dict[str, Detector],
    test: TestSet,
    plan: TimingPlan,
    device: torch.device,
) -> dict[str, dict[str, PassResult]]:
    """Each pipeline's enabled test-time variants, each in a pass of its own over the same images as
    the main pass (the same warm-up, the same timed images in the same order). Without the main
    pass's untimed run of each timed image (``bench.warm_each_image``): that pass has met every
    image's input sizes already, with the same trunk."""
    unwarmed = dataclasses.replace(plan, warm_each=False)
    out: dict[str, dict[str, PassResult]] = {}
    for name, det in detectors.items():
        out[name] = {}
        for variant in det.enabled_variants():
            one = {name: det}
            result = time_pass(
                one,
                test,
                _boxes_for(one, test),
                unwarmed,
                device,
                variant=variant,
                desc=variant,
            )
            out[name][variant] = result[name]
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
    """COCO's metrics of a pass, keeping at least as many detections per image as any image has."""
    most = max((len(d.boxes) for d in result.detections), default=0)
    return coco_metrics(annotations, result.detections, classes, max_dets=max(100, most))


def pipeline_records(
    detectors: dict[str, Detector],
    training: dict[str, dict],
    main: dict[str, PassResult],
    variants: dict[str, dict[str, PassResult]],
    costs: dict[str, dict],
    splits: Splits,
    proposals: dict[str, ProposalSet] | None,
) -> dict[str, dict]:
    """results.json's ``pipelines`` block: per pipeline its training, timing, costs and scores, and
    the same of each enabled variant (its training: the seconds of its own stages)."""
    classes, anns = splits.classes, splits.test.annotations
    proposal_ms = 1000 * float(np.mean(proposals[splits.test.split].seconds)) if proposals else 0.0
    out = {}
    for name, det in detectors.items():
        timing, cost = main[name], costs[name]
        median = float(np.median(timing.samples_ms))
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
                "stages_ms": timing.mean_stages(),
                "end_to_end_ms_per_image": median + (0 if det.owns_proposals else proposal_ms),
                "flops_per_image": cost["flops"],
                "flops_image_proposals": cost["proposals"],
                "achieved_gflops_per_s": cost["flops"] / 1e9 / (median / 1000),
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
        passes: per variant, its timing pass.
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
            "train_s": sum(
                s for stage, s in train_stages_s.items() if stage.startswith(f"{variant}/")
            ),
        }
        for variant, result in passes.items()
    }


def add_efficiency(records: dict[str, dict], costs: dict[str, dict], peaks: dict) -> None:
    """Each pipeline's per-stage FLOPs, bytes, achieved rate and share of the machine's ceiling."""
    for name, rec in records.items():
        cost, stages = costs[name], rec["inference"]["stages_ms"]
        eff = stage_efficiency(cost["stage_flops"], cost["stage_bytes"], stages, peaks)
        rec["inference"]["efficiency"] = eff


def speedup(base: dict, cand: dict, baseline: str, candidate: str, cfg: RunConfig) -> dict:
    """``baseline``'s figures over ``candidate``'s (above 1: the candidate is faster)."""
    b, c = base["inference"], cand["inference"]
    n, seed = cfg.bench.bootstrap_samples, cfg.bench.seed
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


def compute_speedups(records: dict[str, dict], cfg: RunConfig) -> dict[str, dict]:
    """Every pipeline against the baseline, and the extra pairs the config asks for, keyed
    "candidate/baseline"."""
    base = cfg.bench.baseline
    pairs = [(base, name) for name in records if name != base] + list(cfg.bench.pairs)
    return {f"{c}/{b}": speedup(records[b], records[c], b, c, cfg) for b, c in dict.fromkeys(pairs)}


def assemble(
    cfg: RunConfig,
    config_path: str | None,
    device: torch.device,
    splits: Splits,
    proposals: dict[str, ProposalSet] | None,
    plan: TimingPlan,
    backbone: Backbone,
    records: dict[str, dict],
) -> dict:
    """results.json's fields that describe the run (what was run where, on what data)."""
    test = splits.test
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": "",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config_path": config_path,
        "config": to_dict(cfg),
        "env": {**environment(device), "world_size": distributed.world_size()},
        "dataset": {
            "name": splits.train.name,
            "kind": splits.kind,
            "root": str(splits.root),
            "classes": list(splits.classes),
            "train_images": len(splits.train),
            "test_images": len(test),
            "splits": [
                describe(ds, proposals[ds.split].boxes if proposals else None)
                for ds in (splits.train, test)
            ],
        },
        "proposals": _proposal_record(cfg, splits, proposals),
        "timing": {
            "timed_images": len(plan.timed),
            "warmup_images": len(plan.warmup),
            "image_ids": [test.image_ids[i] for i in plan.timed],
            "repeats": plan.repeats,
            "warm_each_image": plan.warm_each,
            "alternating": True,
            "batch_size": 1,
        },
        "backbone": {
            "name": cfg.backbone.name,
            "init_weights_sha1": weights_sha1(backbone),
        },
        "baseline": cfg.bench.baseline,
        "pipelines": records,
    }


def _proposal_record(cfg: RunConfig, splits: Splits, proposals: dict | None) -> dict:
    record = {
        "method": "selective_search" if proposals else "none (every pipeline makes its own)",
        "mode": cfg.proposals.mode,
        "max_per_image": cfg.proposals.max_proposals,
    }
    if not proposals:
        zeros = ("mean_per_image", "seconds_per_image", "recall_iou50", "recall_iou70")
        return {**record, **dict.fromkeys(zeros, 0.0)}
    return {
        **record,
        **proposals[splits.test.split].stats(splits.test),
        "train_seconds_per_image": float(np.mean(proposals[splits.train.split].seconds)),
        "sha1": {split: p.sha1() for split, p in proposals.items()},
    }


def examples(cfg: RunConfig, splits: Splits, main: dict[str, PassResult]) -> list[dict]:
    """The first test images with their ground truth and each pipeline's top detections."""
    test, k = splits.test, cfg.bench.example_detections
    out = []
    for i in range(min(cfg.bench.example_images, len(test))):
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


def write_run_folder(results: dict, cfg: RunConfig) -> Path:
    """Write results.json and config.yaml into a new run folder (built under a temporary name, then
    renamed, so that a crash leaves no half-written run), point ``latest`` at it and append the
    history line."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results["run_id"] = _run_id(cfg.name)
    validate(results)
    run_dir = out / results["run_id"]
    tmp = out / f".{results['run_id']}.tmp-{os.getpid()}"  # a later run removes it if we die
    tmp.mkdir()
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_json(tmp / "results.json", results)
    tmp.rename(run_dir)
    _point_latest(run_dir)
    append_history(out / "history.jsonl", results)
    return run_dir


def _point_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    tmp.replace(latest)
