"""The shared initial weights: ``backbone.pretrain``, the stand-in for ImageNet pre-training.

Every original fine-tuned a network pre-trained on ImageNet classification; the papers' training hours
leave that pre-training out, and every detector starts from the same weights. The CPU default's tiny
network has no such weights, and started from random ones it needs long schedules in every pipeline
(benchmarks/NOTES.md, 2026-11-26). With ``backbone.pretrain.iters`` > 0 the harness instead trains
the randomly initialised backbone, once, to classify object crops of synthetic images drawn from their
own seed (never the run's training or test images): the crops' boxes are jittered by up to 15% of
their sides, warped to the network's input with R-CNN's warp (a context of 1/16 of the input side) and
mirrored with probability 1/2; a K-way classifier on fc7, discarded afterwards, plays ImageNet's 1000-way
one. Mini-batches are drawn from a seeded generator and the SGD loop is every pipeline's
(pipelines.training.run_sgd), so the weights follow from the config.

The weights are cached in ``<cache_dir>/pretrained/`` under a hash of the backbone config, the
procedure's constants, the torch version and the device type, with a JSON sidecar recording how they
were made (seconds, final loss, held-out accuracy); a later run reads them, so the pre-training is paid
once per machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from rcnn_bench.datasets.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, draw_images
from rcnn_bench.pipelines.parts.backbones import (
    Backbone,
    BackboneConfig,
    build_backbone,
    in_format,
    load_weights,
    normalize_image,
)
from rcnn_bench.pipelines.parts.training import SolverConfig, param_groups, run_sgd
from rcnn_bench.pipelines.parts.warp import mirror_regions, warp_regions
from rcnn_bench.pipelines.runtime import distributed
from torch import Tensor, nn

__all__ = [
    "COPIES",
    "JITTER",
    "PRETRAIN_STREAM",
    "ZOOM",
    "crops",
    "initial_backbone",
    "is_cached",
    "jittered",
    "pretrain",
]

# The pre-training images' seed is [PRETRAIN_STREAM, pretrain.seed]: a stream of its own, so that no
# pre-training image is ever one of a synthetic data set's (whose seed is a single integer).
PRETRAIN_STREAM = 0x50524554
JITTER = 0.15  # each box side moves by up to this fraction of the box's width or height
ZOOM = 2.0  # ... then grows about its centre by a factor drawn log-uniformly in [1, ZOOM]
COPIES = 2  # crops of each object, each with its own jitter
HELD_OUT = 0.1  # share of the crops (the last images') that measure accuracy, not train
PROCEDURE = 2  # in the cache key: raise it when the procedure changes beyond these constants


def crops(
    images: int, seed: int, input_size: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Every object of ``images`` synthetic images, jittered and warped: (N, 3, S, S) float32
    mean-subtracted crops and (N,) labels 0..K-1, in image order."""
    out, labels = [], []
    for pixels, ann in draw_images(images, [PRETRAIN_STREAM, seed], SyntheticConfig()):
        image = normalize_image(torch.from_numpy(pixels))
        boxes = torch.from_numpy(ann.boxes).repeat(COPIES, 1)
        out.append(warp_regions(image, jittered(boxes, rng), input_size, input_size // 16))
        labels.append((torch.from_numpy(ann.labels) - 1).repeat(COPIES))
    return torch.cat(out), torch.cat(labels)


def jittered(boxes: Tensor, rng: np.random.Generator) -> Tensor:
    """Each xyxy box with its sides moved by up to JITTER of its size, then grown about its centre
    by a factor in [1, ZOOM] (the object then fills between all and 1/ZOOM of the crop)."""
    wh = boxes[:, 2:] - boxes[:, :2]
    shift = torch.from_numpy(rng.uniform(-JITTER, JITTER, size=boxes.shape).astype(np.float32))
    moved = boxes + shift * torch.cat((wh, wh), 1)
    zoom = torch.from_numpy(np.exp(rng.uniform(0, np.log(ZOOM), size=(len(boxes), 1)))).float()
    centre = 0.5 * (moved[:, :2] + moved[:, 2:])
    half = 0.5 * (moved[:, 2:] - moved[:, :2]) * zoom
    return torch.cat((centre - half, centre + half), 1)


def _logits(backbone: Backbone, classifier: nn.Linear, x: Tensor) -> Tensor:
    return classifier(backbone(backbone.pool5(x)))


def pretrain(backbone: Backbone, cfg: BackboneConfig, device: torch.device) -> dict:
    """Train ``backbone`` in place (then back on the CPU, in eval mode) on synthetic object crops for
    ``cfg.pretrain.iters`` iterations. Returns how: seconds, crops, final loss (mean of the last 20
    iterations) and the accuracy on the held-out images' crops."""
    p = cfg.pretrain
    started = time.perf_counter()
    rng = np.random.default_rng([PRETRAIN_STREAM, p.seed])
    x, y = crops(p.images, p.seed, backbone.input_size, rng)
    crops_s = time.perf_counter() - started
    held = max(1, round(len(x) * HELD_OUT))  # the last images' crops (objects are in image order)
    train_x, train_y, val_x, val_y = x[:-held], y[:-held], x[-held:], y[-held:]
    with torch.random.fork_rng(devices=[]):  # the run's own random stream stays where it was
        torch.manual_seed(p.seed)
        classifier = nn.Linear(backbone.fc_dim, len(SYNTHETIC_CLASSES))
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)
    backbone.to(device).train()
    classifier.to(device)
    gen = torch.Generator().manual_seed(p.seed)

    def loss_fn(_: int) -> Tensor:
        batch = torch.randint(len(train_x), (p.batch_size,), generator=gen)
        flips = torch.rand(p.batch_size, generator=gen) < 0.5
        mine = distributed.share(p.batch_size)  # every process draws the batch, runs its share
        regions = mirror_regions(train_x[batch[mine]].to(device), flips[mine])
        logits = _logits(backbone, classifier, regions)
        loss = F.cross_entropy(logits, train_y[batch[mine]].to(device), reduction="sum")
        return loss / p.batch_size

    solver = SolverConfig(iters=p.iters, paper_iters=p.iters, lr=p.lr, seed=p.seed)
    params = param_groups([(backbone, 1.0), (classifier, 1.0)], solver)
    losses = run_sgd(params, solver, loss_fn, "backbone pre-training")
    backbone.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [_logits(backbone, classifier, c.to(device)).argmax(1).cpu() for c in val_x.split(256)]
        )
    right = int((predicted == val_y).sum())
    backbone.cpu()
    return {
        "iters": p.iters,
        "seconds": time.perf_counter() - started,
        "crops_seconds": crops_s,  # drawing and warping the crops, within "seconds"
        "crops": len(train_x),
        "final_loss": float(np.mean(losses[-20:])),
        "held_out_crops": held,
        "held_out_accuracy": right / held,
    }


def _cache_file(
    cfg: BackboneConfig, cache_dir: Path, device: torch.device, channels_last: bool
) -> Path:
    """Where ``cfg``'s pre-trained weights live: named by a hash of everything they follow from
    (the memory format too: its kernels round otherwise, so its weights are other weights)."""
    key = json.dumps(
        {
            "backbone": dataclasses.asdict(cfg),
            "crops": [PROCEDURE, JITTER, ZOOM, COPIES, HELD_OUT],
            "torch": torch.__version__,
            "device": device.type,
            "channels_last": channels_last,
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / "pretrained" / f"{cfg.name}-{digest}.pt"


def is_cached(
    cfg: BackboneConfig, cache_dir: Path, device: torch.device, channels_last: bool = False
) -> bool:
    """Whether ``cfg``'s pre-trained weights are in the cache (False without pre-training)."""
    path = _cache_file(cfg, cache_dir, device, channels_last)
    return bool(cfg.pretrain.iters) and path.is_file() and path.with_suffix(".json").is_file()


def initial_backbone(
    cfg: BackboneConfig, cache_dir: Path, device: torch.device, channels_last: bool = False
) -> tuple[Backbone, dict | None]:
    """The backbone every pipeline starts from, and the record of its pre-training (None without).

    With ``cfg.pretrain.iters`` the pre-trained weights come from the cache when they are there, and
    are trained (by every process under torchrun, in channels-last memory format with
    ``channels_last``) and cached otherwise. The weights returned are contiguous either way.

    Raises:
        ValueError: a cached weights file cannot be read (the message names it).
    """
    backbone = build_backbone(cfg)
    if not cfg.pretrain.iters:
        return backbone, None
    path = _cache_file(cfg, cache_dir, device, channels_last)
    sidecar = path.with_suffix(".json")
    if is_cached(cfg, cache_dir, device, channels_last):
        load_weights(backbone, path)
        record = json.loads(sidecar.read_text())
        return backbone.eval(), {**record, "cached": True, "file": str(path)}
    record = pretrain(in_format(backbone, channels_last), cfg, device)
    # What a later run reads from the cache, exactly: the weights in a freshly built module, without
    # the last iteration's gradients (a pipeline's optimizer would otherwise meet them).
    trained, backbone = backbone, build_backbone(cfg)
    backbone.load_state_dict(trained.state_dict())
    backbone.eval()
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".pt.partial")
        torch.save(backbone.state_dict(), partial)
        os.replace(partial, path)
        sidecar.write_text(json.dumps(record, indent=1) + "\n")
    if distributed.world_size() > 1:
        torch.distributed.barrier()  # the others return once rank 0 has written the cache
    return backbone, {**record, "cached": False, "file": str(path)}
