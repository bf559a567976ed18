"""The harness: train both detectors on the same proposals and weights, time them, score them.

It knows the detectors only through pipelines.detector.Detector: every step below loops over them
without asking which is which. Timing follows shared/DESIGN.md ("Timing rules"): batch size 1, inputs
and proposals already in memory, warm-up images not counted, the device synchronized around every
timed region, the pipelines alternating image by image.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from benchmarks.config import RunConfig, to_dict
from benchmarks.env import environment, resolve_device
from benchmarks.evaluation import VOCEvaluator
from benchmarks.memory import PeakMemory, allocation_peak
from benchmarks.results import SCHEMA_VERSION, append_history, validate, write_json
from benchmarks.stats import bootstrap_ratio, summarize
from datasets.synthetic import generate
from datasets.voc import VOCDataset
from pipelines.backbones import build_backbone, clone
from pipelines.detector import Detector, TrainData
from pipelines.fast_rcnn import FastRCNN
from pipelines.proposals import ProposalSet, load_or_compute
from pipelines.rcnn import RCNN
from pipelines.timing import StageTimer, synchronize

__all__ = ["run", "ensure_dataset", "build_detectors", "sweep_boxes", "BASELINE", "CANDIDATE"]

BASELINE, CANDIDATE = "rcnn", "fast_rcnn"  # speedup = baseline time / candidate time


def log(message: str) -> None:
    print(f"[rcnn-bench] {message}", flush=True)


def ensure_dataset(cfg: RunConfig) -> tuple[Path, str]:
    """The VOC-format folder to use, generating synthetic data when the config asks for it.

    Returns:
        (folder, a description for the results).
    """
    data = cfg.data
    root = Path(data.root)
    synthetic_root = root
    if data.kind == "voc":
        if (root / "Annotations").is_dir():
            return root, "voc"
        if not data.fallback_to_synthetic:
            raise ValueError(f"{root}: VOC folder not found (run scripts/fetch_voc2007.sh)")
        synthetic_root = root.parent / f"synthetic-fallback-{data.synthetic.seed}"
        log(f"{root} not found: using synthetic images of the configured size at {synthetic_root}")
    marker = synthetic_root / ".generated.json"
    wanted = json.dumps(dataclasses.asdict(data.synthetic), sort_keys=True)
    if not marker.is_file() or marker.read_text() != wanted:
        log(f"generating synthetic data into {synthetic_root}")
        generate(synthetic_root, data.synthetic)
        marker.write_text(wanted)
    kind = "synthetic" if data.kind == "synthetic" else "synthetic (VOC folder missing)"
    return synthetic_root, kind


def build_detectors(cfg: RunConfig, num_classes: int, device: torch.device) -> dict[str, Detector]:
    """Both detectors, each on its own copy of one backbone (the same initial weights)."""
    backbone = build_backbone(cfg.backbone)
    cache = Path(cfg.cache_dir)
    return {
        BASELINE: RCNN(clone(backbone), num_classes, cfg.rcnn, device, cache),
        CANDIDATE: FastRCNN(clone(backbone), num_classes, cfg.fast_rcnn, device),
    }


def weights_sha1(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers, to show both detectors start from the same weights."""
    digest = hashlib.sha1()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def _timed_detect(det: Detector, image, boxes, device, variant=None):
    timer = StageTimer(device)
    synchronize(device)
    start = time.perf_counter()
    dets = det.detect(image, boxes, timer, variant)
    synchronize(device)
    return (
        dets,
        (time.perf_counter() - start) * 1000,
        {k: v * 1000 for k, v in timer.seconds.items()},
    )


def _mean_stages(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean ms of each stage over the timed images (a stage an image skipped counts as 0)."""
    names = sorted({k for stages in per_image for k in stages})
    return {k: float(np.mean([stages.get(k, 0.0) for stages in per_image])) for k in names}


def _map_record(result: dict) -> dict:
    """The AP figures results.json keeps from an evaluation (the PR curves are kept apart)."""
    return {k: result[k] for k in ("voc07", "area", "voc07_strict", "strict_iou", "per_class")}


def _run_id(name: str) -> str:
    return f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"


def run(cfg: RunConfig, config_path: str | None = None) -> Path:
    """One benchmark run. Returns the run folder (results.json inside)."""
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.output_dir) / _run_id(cfg.name)
    while run_dir.exists():  # two runs in one second: never overwrite
        run_dir = run_dir.with_name(run_dir.name + "x")
    log(f"run {run_dir.name} on {device}")

    # -- data and shared proposals ----------------------------------------------------------------
    root, kind = ensure_dataset(cfg)
    train_ds = VOCDataset(root, cfg.data.train_split, cfg.data.train_limit)
    test_ds = VOCDataset(root, cfg.data.test_split, cfg.data.test_limit)
    if train_ds.classes != test_ds.classes:
        raise ValueError(f"{root}: train and test splits disagree on the class list")
    props: dict[str, ProposalSet] = {}
    for ds in (train_ds, test_ds):
        props[ds.split], cached = load_or_compute(
            ds, cfg.proposals, cfg.cache_dir, cfg.proposal_workers
        )
        log(f"proposals {ds.split}: {'read from cache' if cached else 'computed and cached'}")
    prop_stats = props[test_ds.split].stats(test_ds)
    log("loading images")
    train = TrainData(
        [train_ds.load_image(i) for i in range(len(train_ds))],
        train_ds.annotations,
        props[train_ds.split].boxes,
        train_ds.num_classes,
    )
    test_images = [torch.from_numpy(test_ds.load_image(i)).to(device) for i in range(len(test_ds))]
    test_boxes = [torch.from_numpy(b).to(device) for b in props[test_ds.split].boxes]

    # -- training ---------------------------------------------------------------------------------
    detectors = build_detectors(cfg, train_ds.num_classes, device)
    init_hashes = {name: weights_sha1(det.net) for name, det in detectors.items()}
    if len(set(init_hashes.values())) != 1:
        raise RuntimeError(f"detectors start from different backbone weights: {init_hashes}")
    records: dict[str, dict] = {}
    for name, det in detectors.items():
        log(f"training {name}")
        timer = StageTimer(device)
        with PeakMemory(device) as mem:
            info = det.fit(train, timer)
        stages = dict(timer.seconds)
        records[name] = {
            "train": {
                "stages_s": stages,
                "total_s": sum(stages.values()),
                "paper_schedule": det.paper_schedule(stages),
                "peak_memory_bytes": mem.peak_bytes,
                "peak_memory_method": mem.method,
                "info": info,
            }
        }
        if "feature_cache_bytes" in info:
            records[name]["feature_cache_bytes"] = info["feature_cache_bytes"]
    del train

    # -- inference: alternate image by image ------------------------------------------------------
    bench = cfg.bench
    n_test = len(test_images)
    timed = range(min(bench.warmup_images, n_test), n_test)
    if bench.timed_images:
        timed = timed[: bench.timed_images]
    evaluators = {name: VOCEvaluator(test_ds.classes) for name in detectors}
    samples = {name: [] for name in detectors}
    stage_samples: dict[str, list[dict]] = {name: [] for name in detectors}
    for i in range(min(bench.warmup_images, n_test)):
        for det in detectors.values():
            _timed_detect(det, test_images[i], test_boxes[i], device)
    order = list(detectors.items())
    examples = [
        {
            "image": str(test_ds.image_path(test_ds.image_ids[i]).resolve()),
            "image_id": test_ds.image_ids[i],
            "gt_boxes": test_ds.annotations[i].boxes.tolist(),
            "gt_labels": test_ds.annotations[i].labels.tolist(),
            "detections": {},
        }
        for i in range(min(bench.example_images, n_test))
    ]
    for i in tqdm(range(n_test), desc="inference (alternating)", unit="img"):
        for name, det in order if i % 2 == 0 else order[::-1]:
            dets, ms, stages = _timed_detect(det, test_images[i], test_boxes[i], device)
            evaluators[name].process(test_ds.annotations[i], dets)
            if i < len(examples):
                k = bench.example_detections
                examples[i]["detections"][name] = {
                    "boxes": dets.boxes[:k].tolist(),
                    "scores": dets.scores[:k].tolist(),
                    "labels": dets.labels[:k].tolist(),
                }
            if i in timed:
                samples[name].append(ms)
                stage_samples[name].append(stages)
    if not samples[BASELINE]:
        raise ValueError(
            f"{test_ds.split}: no image left to time after {bench.warmup_images} warm-up"
        )
    proposal_ms = prop_stats["seconds_per_image"] * 1000
    for name in detectors:
        result = evaluators[name].evaluate()
        records[name]["inference"] = {
            "ms_per_image": summarize(samples[name]),
            "samples_ms": samples[name],
            "stages_ms": _mean_stages(stage_samples[name]),
            "end_to_end_ms_per_image": float(np.median(samples[name])) + proposal_ms,
        }
        records[name]["map"] = _map_record(result)
        records[name]["pr"] = result["pr"]

    # -- test-time variants (R-CNN without box regression, Fast R-CNN with truncated SVD) ----------
    for name, det in detectors.items():
        records[name]["variants"] = {}
        for variant in det.variants:
            ev = VOCEvaluator(test_ds.classes)
            ms_list, stage_list = [], []
            for i in tqdm(range(n_test), desc=f"{name} {variant}", unit="img"):
                dets, ms, stages = _timed_detect(
                    det, test_images[i], test_boxes[i], device, variant
                )
                ev.process(test_ds.annotations[i], dets)
                if i in timed:
                    ms_list.append(ms)
                    stage_list.append(stages)
            records[name]["variants"][variant] = {
                "map": _map_record(ev.evaluate()),
                "ms_per_image": summarize(ms_list),
                "stages_ms": _mean_stages(stage_list),
            }

    # -- FLOPs (counted by torch's FLOP counter on one image) and peak memory ------------------------
    probe = timed[0]
    for name, det in detectors.items():
        with FlopCounterMode(display=False) as counter:
            det.detect(test_images[probe], test_boxes[probe], StageTimer(device))
        flops = counter.get_total_flops()
        peak, method = allocation_peak(
            lambda det=det: det.detect(test_images[probe], test_boxes[probe], StageTimer(device)),
            device,
        )
        median_s = records[name]["inference"]["ms_per_image"]["median"] / 1000
        records[name]["inference"]["flops_per_image"] = flops
        records[name]["inference"]["flops_image_proposals"] = int(test_boxes[probe].shape[0])
        records[name]["inference"]["achieved_gflops_per_s"] = flops / 1e9 / median_s
        records[name]["peak_memory_bytes"] = peak
        records[name]["peak_memory_method"] = method

    # -- sweep over proposals per image ---------------------------------------------------------------
    sweep = {
        "proposals": list(bench.sweep_proposals),
        "images": 0,
        "ms": {n: [] for n in detectors},
    }
    sweep_ids = list(timed)[: bench.sweep_images]
    sweep["images"] = len(sweep_ids)
    for n in tqdm(bench.sweep_proposals, desc="proposal sweep", unit="point"):
        per = {name: [] for name in detectors}
        for i in sweep_ids:
            size = tuple(test_images[i].shape[:2])
            boxes = sweep_boxes(props[test_ds.split].boxes[i], n, size, bench.seed + i)
            boxes_t = torch.from_numpy(boxes).to(device)
            for name, det in order if i % 2 == 0 else order[::-1]:
                per[name].append(_timed_detect(det, test_images[i], boxes_t, device)[1])
        for name in detectors:
            sweep["ms"][name].append(float(np.median(per[name])))

    # -- speedups and results ------------------------------------------------------------------------
    base, cand = records[BASELINE], records[CANDIDATE]
    speedup = {
        "train": base["train"]["total_s"] / cand["train"]["total_s"],
        "train_paper_schedule": base["train"]["paper_schedule"]["hours"]
        / cand["train"]["paper_schedule"]["hours"],
        "inference": bootstrap_ratio(
            base["inference"]["samples_ms"],
            cand["inference"]["samples_ms"],
            bench.bootstrap_samples,
            bench.seed,
        ),  # fmt: skip
        "end_to_end": base["inference"]["end_to_end_ms_per_image"]
        / cand["inference"]["end_to_end_ms_per_image"],
        "flops": base["inference"]["flops_per_image"]
        / max(cand["inference"]["flops_per_image"], 1),
    }
    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_dir.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config_path": config_path,
        "config": to_dict(cfg),
        "env": environment(device),
        "dataset": {
            "name": train_ds.name,
            "kind": kind,
            "root": str(root),
            "classes": list(train_ds.classes),
            "train_images": len(train_ds),
            "test_images": len(test_ds),
        },
        "proposals": {
            "method": "selective_search",
            "mode": cfg.proposals.mode,
            "max_per_image": cfg.proposals.max_proposals,
            **prop_stats,
            "train_seconds_per_image": float(np.mean(props[train_ds.split].seconds)),
        },
        "timing": {
            "timed_images": len(samples[BASELINE]),
            "warmup_images": min(bench.warmup_images, n_test),
            "alternating": True,
            "batch_size": 1,
        },
        "backbone": {"name": cfg.backbone.name, "init_weights_sha1": init_hashes[BASELINE]},
        "pipelines": records,
        "speedup": speedup,
        "sweep": sweep,
        "examples": examples,
        "wall_s": time.perf_counter() - started,
    }
    validate(results)
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_json(run_dir / "results.json", results)
    _point_latest(run_dir)
    append_history(Path(cfg.output_dir) / "history.jsonl", results)
    _render(run_dir)
    print(summary_table(results))
    log(f"wrote {run_dir / 'results.json'} ({results['wall_s']:.0f} s)")
    return run_dir


def _point_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    tmp.replace(latest)


def _render(run_dir: Path) -> None:
    try:
        from benchmarks.report import render
    except ImportError:
        return
    render([run_dir], run_dir)


def summary_table(results: dict) -> str:
    """The short table `rcnn-bench run` prints at the end."""
    rows = [
        f"{'pipeline':<11} {'train s':>9} {'paper-sched h':>13} {'ms/img med':>10} {'p90':>8} "
        f"{'end-to-end ms':>13} {'GFLOP/img':>10} {'VOC07 mAP':>9} {'mAP@0.7':>8}"
    ]
    for name, rec in results["pipelines"].items():
        inf = rec["inference"]
        rows.append(
            f"{name:<11} {rec['train']['total_s']:>9.1f} {rec['train']['paper_schedule']['hours']:>13.2f} "
            f"{inf['ms_per_image']['median']:>10.1f} {inf['ms_per_image']['p90']:>8.1f} "
            f"{inf['end_to_end_ms_per_image']:>13.1f} {inf['flops_per_image'] / 1e9:>10.2f} "
            f"{rec['map']['voc07']:>9.3f} {rec['map']['voc07_strict']:>8.3f}"
        )
        for variant, v in rec.get("variants", {}).items():
            rows.append(
                f"  {variant:<9} {'':>9} {'':>13} {v['ms_per_image']['median']:>10.1f} "
                f"{v['ms_per_image']['p90']:>8.1f} {'':>13} {'':>10} {v['map']['voc07']:>9.3f} "
                f"{v['map']['voc07_strict']:>8.3f}"
            )
    s = results["speedup"]
    lo, hi = s["inference"]["ci95"]
    rows.append(
        f"speedup {CANDIDATE} over {BASELINE}: train {s['train']:.1f}x, inference "
        f"{s['inference']['value']:.1f}x (95% CI {lo:.1f}-{hi:.1f}), end-to-end {s['end_to_end']:.1f}x, "
        f"FLOPs {s['flops']:.1f}x"
    )
    return "\n".join(rows)
