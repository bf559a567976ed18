"""`rcnn-bench run --dry-run`: check a config, its data, weights and folders, and print what the run
would take, writing nothing into the output folder:

    preflight (config, folders, data, weights) -> proposal counts -> disk -> the device's rates ->
    a short probe (each pipeline trained for a few iterations on a few images, then detecting on
    them) -> memory and time estimates scaled from it -> refuse in one line, or print the plan

The probe is hollow by default (benchmarks.machine.estimate): its convolutions and matrix products are
not computed but estimated from their FLOP and byte counts at rates measured on the backbone's own
layers (or a named device's rates from benchmarks/machine/devices.yaml, ``--plan-for``), so that it
takes seconds on any machine whatever the backbone; ``--probe full`` computes everything, as a run.

It knows the pipelines only through the registry and the Detector interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rcnn_bench.benchmarks.config import RunConfig
from rcnn_bench.benchmarks.harness.data import Splits, load_splits
from rcnn_bench.benchmarks.harness.preflight import check_disk, check_output, check_splits
from rcnn_bench.benchmarks.harness.pretrain import is_cached, pretrain
from rcnn_bench.benchmarks.machine.env import seeded, setup
from rcnn_bench.benchmarks.machine.estimate import Hollow, HollowTimer, Rates, measure_rates
from rcnn_bench.benchmarks.machine.memory import PeakMemory, rss_bytes
from rcnn_bench.pipelines import registry
from rcnn_bench.pipelines.context import BuildContext
from rcnn_bench.pipelines.detector import SHARED_STAGE
from rcnn_bench.pipelines.parts.backbones import Backbone, build_backbone, clone, in_format
from rcnn_bench.pipelines.parts.detections import TrainData
from rcnn_bench.pipelines.parts.proposals import cache_path, load, selective_search
from rcnn_bench.pipelines.runtime.timing import (
    StageTimer,
    arithmetic,
    channels_last_on,
    synchronize,
)

__all__ = [
    "PROBES",
    "PROBE_IMAGES",
    "PROBE_ITERS",
    "Plan",
    "Probe",
    "dry_run",
    "memory_plan",
    "probe_rates",
]

PROBE_IMAGES = 2  # training images the probe trains and detects on
PROBE_ITERS = 2  # SGD iterations of each iteration stage in the probe
PROBE_PRETRAIN_IMAGES = 20  # images whose crops the pre-training probe draws
PROBES = ("estimate", "full")  # --probe: hollow (heavy operations estimated) or computed
DEVICES = Path(__file__).resolve().parents[1] / "machine" / "devices.yaml"


@dataclass
class Probe:
    """What the probe measured.

    Attributes:
        images: training images it used.
        proposal_s: selective search, seconds per image.
        train_s: per pipeline, per training stage, seconds on the probe's images and iterations.
        detect_s: per pipeline, seconds per image of ``detect``.
        peak_bytes: per pipeline, the peak memory of its probe training above where it started (the
            device's allocator on CUDA, the resident set on the CPU).
        model_bytes: per pipeline, the bytes of the model it runs at test time.
        passes: per pipeline, test passes a run makes (the main one and one per group of enabled
            variants, Detector.variant_groups: a group's pass is costed as one of the default's).
    """

    images: int
    proposal_s: float
    train_s: dict[str, dict[str, float]]
    detect_s: dict[str, float]
    peak_bytes: dict[str, int]
    model_bytes: dict[str, int]
    passes: dict[str, int]


@dataclass
class Plan:
    """A run's plan.

    Attributes:
        device: where it would run.
        splits: per split name, {"images", "proposals", "cached"} (proposals counted from the cache
            when it exists, else images x proposals.max_proposals, an upper bound).
        disk: check_disk's bytes per cache and "free".
        memory: memory_plan's {"ram": {...}, "gpu": {...} or None}.
        stages_s: per pipeline (and "proposals"), per stage, estimated seconds.
        probe_images: how many training images the probe measured on.
        load: the 1-minute load average when the probe ended, and the CPU count.
        rates: the rates a hollow probe's skipped operations were estimated at (None: ``full``).
    """

    device: str
    splits: dict[str, dict]
    disk: dict[str, int]
    memory: dict[str, dict | None]
    stages_s: dict[str, dict[str, float]]
    probe_images: int
    load: tuple[float, int]
    rates: Rates | None = None


def dry_run(cfg: RunConfig, probe: str = "estimate", plan_for: str | None = None) -> Plan:
    """Check everything a run needs, estimate what it takes, print the plan.

    Args:
        cfg: the run's config.
        probe: "estimate" (hollow: heavy operations estimated from their FLOPs and bytes) or "full"
            (every operation computed, as the run would).
        plan_for: a device named in devices.yaml whose rates the skipped operations are estimated
            at, instead of this machine's (the rest of the probe still runs here).

    Raises:
        ValueError: the config, data, weights or folders are unusable, or the disk or memory cannot
            hold the run (the message names the knob that helps).
    """
    base_rss = rss_bytes()
    device = setup(cfg)
    check_output(cfg.output_dir, cfg.cache_dir, create=False)
    splits = load_splits(cfg.data)
    check_splits(splits)
    classes = [registry.get(name) for name in cfg.pipelines]
    backbone = build_backbone(cfg.backbone)  # reads the weights file, if the config names one
    # The run's memory format: the probe's copies (deep copies keep it) run as the run's networks.
    in_format(backbone, channels_last_on(cfg.bench.channels_last, device))
    counts = proposal_counts(cfg, splits)
    disk = check_disk(cfg, splits, classes, backbone)
    rates = probe_rates(probe, plan_for, backbone, device, cfg.bench.precision)
    hollow = Hollow(rates) if rates else None
    measured = run_probe(cfg, splits, backbone, device, hollow)
    memory = memory_plan(cfg, splits, backbone, measured, device, base_rss)
    check_memory(memory)  # after a hollow probe a lower bound: its training peaks are not the run's
    stages = stage_estimates(cfg, splits, counts, measured)
    if cfg.backbone.pretrain.iters:
        stages["backbone"] = {"pre-training": pretrain_estimate(cfg, device, hollow)}
    load = (os.getloadavg()[0], os.cpu_count() or 1)
    where = plan_for or str(device)
    plan = Plan(where, counts, disk, memory, stages, measured.images, load, rates)
    print(format_plan(plan, cfg))
    return plan


def probe_rates(
    probe: str, plan_for: str | None, backbone: Backbone, device: torch.device, precision: str
) -> Rates | None:
    """The rates a hollow probe estimates at: None for the ``full`` probe, a named device's from
    devices.yaml, else measured here on a copy of the backbone (estimate.measure_rates).

    Raises:
        ValueError: an unknown probe, or a device or precision devices.yaml does not have.
    """
    if probe not in PROBES:
        raise ValueError(f"--probe must be one of {', '.join(PROBES)}, got {probe!r}")
    if probe == "full":
        if plan_for:
            raise ValueError("--plan-for needs --probe estimate (a full probe runs here)")
        return None
    here = measure_rates(clone(backbone).to(device), precision)
    if plan_for is None:
        return here
    return named_rates(plan_for, precision, DEVICES, here.linalg)


def named_rates(name: str, precision: str, path: Path, linalg: float) -> Rates:
    """A named device's rates at ``precision`` from the table at ``path`` (devices.yaml); its SVDs,
    which the table does not measure, at ``linalg`` (this machine's rate).

    Raises:
        ValueError: the table has no such device, or no figures at that precision.
    """
    table = yaml.safe_load(path.read_text())
    if name not in table:
        raise ValueError(f"--plan-for: {name!r} is not in {path} (it has: {', '.join(table)})")
    entry = table[name]
    if precision not in entry["rates"]:
        have = ", ".join(entry["rates"])
        raise ValueError(
            f"--plan-for {name}: {path} has no figures at bench.precision {precision} (it has: "
            f"{have})"
        )
    rate = entry["rates"][precision]
    return Rates(
        conv=rate["conv"],
        conv_backward=rate["conv_backward"],
        matmul=rate["matmul"],
        linalg=linalg,
        memory=entry["memory"],
        source=f"{entry['device']} ({entry['source']})",
    )


def proposal_counts(cfg: RunConfig, splits: Splits) -> dict[str, dict]:
    """Per split: images, proposals (from the cache when there is one, else images x
    ``proposals.max_proposals``) and whether they are cached."""
    out = {}
    for ds in (splits.train, splits.test):
        path = cache_path(cfg.cache_dir, ds, cfg.proposals)
        cached = path.is_file()
        if cached:
            count = sum(len(b) for b in load(path, ds).boxes)
        else:
            count = len(ds) * cfg.proposals.max_proposals
        out[ds.split] = {"images": len(ds), "proposals": count, "cached": cached}
    return out


def run_probe(
    cfg: RunConfig,
    splits: Splits,
    backbone: Backbone,
    device: torch.device,
    hollow: Hollow | None = None,
) -> Probe:
    """Train every configured pipeline for PROBE_ITERS iterations per iteration stage on the first
    PROBE_IMAGES training images (their proposals computed here, not cached), then time ``detect``
    on the same images (after one untimed detection). Training caches go to a temporary folder,
    removed afterwards. The probe's first iterations carry one-off costs, and other processes slow
    it as much as the run: the estimates err high on a busy machine (the plan prints the load).

    Under ``hollow`` the training and the detections run hollow: every stage's time is its wall
    time plus the estimated time of the operations skipped in it."""
    ds = splits.train
    k = min(PROBE_IMAGES, len(ds))
    images = [ds.load_image(i) for i in range(k)]
    start = time.perf_counter()
    boxes = [selective_search(im, cfg.proposals, ds.image_ids[i]) for i, im in enumerate(images)]
    proposal_s = (time.perf_counter() - start) / k
    split = TrainData(images, ds.annotations[:k], boxes, ds.num_classes)
    probe = Probe(k, proposal_s, {}, {}, {}, {}, {})
    hollow_mode = hollow if hollow is not None else contextlib.nullcontext()
    skipped = lambda: hollow.seconds if hollow is not None else 0.0  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="rcnn-bench-probe-") as tmp, hollow_mode:
        context = BuildContext(ds.num_classes, device, lambda: clone(backbone), Path(tmp))
        for name, block in cfg.pipelines.items():
            cls = registry.get(name)
            det = cls(cls.with_iterations(block, PROBE_ITERS), context)
            timer = HollowTimer(device, hollow)
            data = det.training_split(split)
            with PeakMemory(device) as mem, seeded(cfg.seed, name):
                det.fit(data, timer)
                det.fit_variants(data, timer)  # "<variant>/<stage>"
            first = None if det.owns_proposals else torch.from_numpy(boxes[0]).to(device)
            with arithmetic(device, cfg.bench.precision):  # the test passes' own
                det.detect(torch.from_numpy(images[0]).to(device), first, StageTimer(device))
                det.start_pass(k)
                start, before = time.perf_counter(), skipped()
                found = []
                for im, b in zip(images, boxes, strict=True):
                    props = None if det.owns_proposals else torch.from_numpy(b).to(device)
                    image = torch.from_numpy(im).to(device)
                    found.append(det.detect(image, props, StageTimer(device)))
                synchronize(device)
            probe.detect_s[name] = (time.perf_counter() - start + skipped() - before) / k
            det.finish_pass(found)
            probe.train_s[name] = dict(timer.seconds)
            probe.peak_bytes[name] = mem.peak_bytes
            probe.model_bytes[name] = det.model_size()["bytes"]
            probe.passes[name] = 1 + len(det.variant_groups(det.enabled_variants()))
    return probe


def memory_plan(
    cfg: RunConfig,
    splits: Splits,
    backbone: Backbone,
    probe: Probe,
    device: torch.device,
    base_bytes: int,
) -> dict[str, dict | None]:
    """Peak memory of the run, by what holds it.

    With R = proposals.max_proposals, the training images (H x W x 3 bytes each, decoded) and the
    proposals of both splits (16 R bytes per image) stay in RAM for the whole run; every pipeline is
    built before the first trains, so their test-time models (probe.model_bytes) are resident
    together; the pipelines train one at a time, each holding what its probe training peaked at
    (network, gradients, optimizer state, one batch: probe.peak_bytes) and what grows with the
    training set (Detector.train_ram_bytes). The test images and their proposals are moved to the
    device. So, with B the process's memory before the dry run (libraries):

        RAM = B + train images + proposals + max over pipelines of (train_ram_bytes [+ peak on CPU])
              [+ test images + models on CPU]
        GPU = test images + test proposals + models + max over pipelines of peak        (CUDA only)

    Returns:
        {"ram": {part: bytes, ..., "total", "available"}, "gpu": the same or None on the CPU}; each
        part's knob is in KNOBS (a pipeline's part is named after it).
    """
    r = cfg.proposals.max_proposals
    train, test = splits.train, splits.test
    train_images, test_images = (
        sum(h * w * 3 for h, w in (a.size for a in ds.annotations)) for ds in (train, test)
    )
    extra = {
        name: registry.get(name).train_ram_bytes(block, len(train), r, backbone)
        for name, block in cfg.pipelines.items()
    }
    on_gpu = device.type == "cuda"
    ram = {
        "libraries": base_bytes,
        "train images": train_images,
        "proposals": (len(train) + len(test)) * r * 16,
    }
    worst = max(cfg.pipelines, key=lambda n: extra[n] + (0 if on_gpu else probe.peak_bytes[n]))
    ram[f"{worst} training"] = extra[worst] + (0 if on_gpu else probe.peak_bytes[worst])
    device_part = {
        "test images": test_images,
        "models": sum(probe.model_bytes.values()),
    }
    gpu = None
    if on_gpu:
        top = max(probe.peak_bytes, key=probe.peak_bytes.get)
        gpu = {
            **device_part,
            "test proposals": len(test) * r * 16,
            f"{top} training": probe.peak_bytes[top],
        }
        gpu.update(total=sum(gpu.values()), available=torch.cuda.mem_get_info(device)[0])
    else:
        ram.update(device_part)
    ram.update(total=sum(ram.values()), available=_available_ram())
    return {"ram": ram, "gpu": gpu}


def _available_ram() -> int:
    """MemAvailable from /proc/meminfo, in bytes (what can be used without swapping)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


KNOBS = {
    "train images": "data.train_limit",
    "test images": "data.test_limit",
    "proposals": "proposals.max_proposals",
    "test proposals": "proposals.max_proposals",
    "models": "backbone.name",
    "libraries": "nothing in the config (the libraries alone)",
}


def check_memory(memory: dict[str, dict | None]) -> None:
    """Raise ValueError naming the knob of the biggest part when RAM or GPU memory cannot hold the
    run."""
    for where, parts in memory.items():
        if parts is None or parts["total"] <= parts["available"]:
            continue
        items = {k: v for k, v in parts.items() if k not in ("total", "available")}
        biggest = max(items, key=items.get)
        knob = KNOBS.get(biggest)
        if knob is None:  # "<pipeline> training"
            name = biggest.split()[0]
            knob = f"proposals.max_proposals or data.train_limit (what pipelines.{name} trains on)"
        raise ValueError(
            f"{where.upper()}: the run needs about {_size(parts['total'])}, "
            f"{_size(parts['available'])} is available; the most is {biggest} "
            f"({_size(items[biggest])}): lower {knob}"
        )


def pretrain_estimate(cfg: RunConfig, device: torch.device, hollow: Hollow | None = None) -> float:
    """Seconds the backbone's pre-training will take: 0 when its weights are cached; else scaled from
    a probe of PROBE_ITERS iterations on crops of PROBE_PRETRAIN_IMAGES images (the crops by the
    images, the iterations by the iterations), hollow under ``hollow`` (the skipped operations'
    estimated time added to the iterations')."""
    p = cfg.backbone.pretrain
    channels_last = channels_last_on(cfg.bench.channels_last, device)
    if is_cached(cfg.backbone, Path(cfg.cache_dir), device, channels_last):
        return 0.0
    small = dataclasses.replace(p, iters=PROBE_ITERS, images=PROBE_PRETRAIN_IMAGES)
    probe_cfg = dataclasses.replace(cfg.backbone, pretrain=small)
    before = hollow.seconds if hollow is not None else 0.0
    with hollow if hollow is not None else contextlib.nullcontext():
        record = pretrain(in_format(build_backbone(probe_cfg), channels_last), probe_cfg, device)
    skipped_s = hollow.seconds - before if hollow is not None else 0.0
    crops_s = record["crops_seconds"] * p.images / PROBE_PRETRAIN_IMAGES
    iters_s = record["seconds"] - record["crops_seconds"] + skipped_s
    return crops_s + iters_s * p.iters / PROBE_ITERS


def stage_estimates(
    cfg: RunConfig, splits: Splits, counts: dict[str, dict], probe: Probe
) -> dict[str, dict[str, float]]:
    """Seconds per stage, scaled from the probe: an iteration stage (Detector.iteration_stages) by
    the configured over the probe's iterations, a fixed stage (Detector.fixed_stages, a variant's
    too) not at all,
    every other training stage by the training images over the probe's (a SHARED_STAGE, seconds
    that another stage counts, not at all), the test passes (the main one and one per group of
    enabled variants) by the test images; selective search by the uncached images over
    ``proposal_workers``; each training seed after the first (``bench.seeds``) its training again and
    one pass over the test images."""
    n_train, n_test = len(splits.train), len(splits.test)
    uncached = sum(c["images"] for c in counts.values() if not c["cached"])
    out = {"proposals": {"selective search": probe.proposal_s * uncached / cfg.proposal_workers}}
    for name, block in cfg.pipelines.items():
        cls = registry.get(name)
        iters = cls.iteration_stages(block)
        probe_iters = cls.iteration_stages(cls.with_iterations(block, PROBE_ITERS))
        stages = {
            stage: s * iters[stage] / probe_iters[stage]
            if stage in iters
            else s
            if stage.rsplit("/", 1)[-1]
            in cls.fixed_stages  # a variant's stage: "<variant>/<stage>"
            else s * n_train / probe.images
            for stage, s in probe.train_s[name].items()
            if stage.rsplit("/", 1)[-1] != SHARED_STAGE  # seconds another stage already counts
        }
        more = len(cfg.training_seeds) - 1  # bench.seeds: each trains again and detects once
        if more:
            stages["more seeds"] = more * (sum(stages.values()) + probe.detect_s[name] * n_test)
        stages["test passes"] = probe.detect_s[name] * n_test * probe.passes[name]
        out[name] = stages
    return out


def format_plan(plan: Plan, cfg: RunConfig) -> str:
    """The plan as text: splits, caches, memory, stage times."""
    lines = [
        f"plan for {cfg.name!r} on {plan.device} (a dry run: nothing trained, nothing written)"
    ]
    lines.append(f"{'split':<12} {'images':>7} {'proposals':>11}  source")
    for split, c in plan.splits.items():
        source = "cache" if c["cached"] else "at most (images x proposals.max_proposals)"
        lines.append(f"{split:<12} {c['images']:>7} {c['proposals']:>11}  {source}")
    free = plan.disk["free"]
    caches = {k: v for k, v in plan.disk.items() if k != "free"}
    lines.append(f"disk ({cfg.cache_dir}): {_size(sum(caches.values()))} of {_size(free)} free")
    lines += [f"  {k:<20} {_size(v):>10}" for k, v in caches.items()]
    for where, parts in plan.memory.items():
        if parts is None:
            continue
        lines.append(
            f"{where.upper()} peak: {_size(parts['total'])} of {_size(parts['available'])} available"
        )
        lines += [
            f"  {k:<20} {_size(v):>10}" for k, v in parts.items() if k not in ("total", "available")
        ]
    total = sum(s for stages in plan.stages_s.values() for s in stages.values())
    how = "a probe"
    if plan.rates is not None:
        r = plan.rates
        how = (
            f"a hollow probe: convolutions {r.conv:.0f} GFLOP/s forward, {r.conv_backward:.0f} "
            f"backward, matrix products {r.matmul:.0f}, memory {r.memory:.1f} GB/s, {r.source}; "
            "the rest measured here, on"
        )
    lines.append(
        f"time (estimated from {how} {plan.probe_images} images, load {plan.load[0]:.1f} on "
        f"{plan.load[1]} CPUs): {total / 3600:.2f} h ({total:.0f} s)"
    )
    for name, stages in plan.stages_s.items():
        lines += [f"  {name + ' ' + stage:<32} {s:>10.1f} s" for stage, s in stages.items()]
    return "\n".join(lines)


def _size(n: float) -> str:
    """Bytes in the largest unit that keeps the figure at least 1 (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
