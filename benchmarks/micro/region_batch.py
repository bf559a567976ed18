"""R-CNN's time per region at several region batches (``pipelines.rcnn.region_batch``), to choose it.

    python -m benchmarks.micro.region_batch --backbone tiny --regions 512 --batches 16 32 64 128 256 512

Times RCNN._layers (warp, trunk and pool5, fc6/fc7: what region_batch chunks) on ``--regions`` random
boxes of a random 192x256 image (a 375x500 one for AlexNet and VGG16, VOC's usual size), the batch
sizes interleaved round by round (benchmarks.reference.interleaved_times), and prints each batch's
median and minimum milliseconds per region. Random weights: the time does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from rcnn_bench.benchmarks.micro.reference import interleaved_times
from rcnn_bench.pipelines import registry
from rcnn_bench.pipelines.context import BuildContext
from rcnn_bench.pipelines.detector import Detector
from rcnn_bench.pipelines.parts.backbones import BackboneConfig, build_backbone, normalize_image
from rcnn_bench.pipelines.runtime.timing import StageTimer

__all__ = ["random_boxes", "region_seconds"]

IMAGE_SIZES = {"tiny": (192, 256), "alexnet": (375, 500), "vgg16": (375, 500)}


def random_boxes(n: int, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """(n, 4) xyxy boxes inside an image of ``size`` (H, W), each side 1/16 to 1/2 of the image's."""
    h, w = size
    wh = torch.rand(n, 2, generator=gen) * 7 / 16 + 1 / 16  # (n, 2) fractions of (W, H)
    xy = torch.rand(n, 2, generator=gen) * (1 - wh)
    scale = torch.tensor([float(w), float(h)])
    return torch.cat((xy * scale, (xy + wh) * scale), dim=1)


def region_seconds(
    det: Detector, image: torch.Tensor, boxes: torch.Tensor, stages: tuple[str, ...]
):
    """A measure for interleaved_times: one RCNN._layers pass over ``boxes``, the seconds its
    ``stages`` ("warp", "conv", "fc") took, summed."""

    def measure() -> float:
        timer = StageTimer(det.device)
        det._layers(det.net, image, boxes, timer)
        return sum(timer.seconds[s] for s in stages)

    return measure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(IMAGE_SIZES), default="tiny")
    parser.add_argument("--regions", type=int, default=512, help="boxes per pass")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up")
    args = parser.parse_args(argv)

    backbone = build_backbone(BackboneConfig(name=args.backbone)).eval()
    # Every batch size runs the one network (the harness hands each pipeline a copy).
    context = BuildContext(1, torch.device("cpu"), lambda: backbone, Path("."))
    gen = torch.Generator().manual_seed(0)
    size = IMAGE_SIZES[args.backbone]
    image = normalize_image(torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=gen))
    boxes = random_boxes(args.regions, size, gen)
    measures = {}
    rcnn = registry.get("rcnn")
    for b in args.batches:
        det = rcnn(rcnn.config_class(region_batch=b, variants=()), context)
        measures[b] = region_seconds(det, image, boxes, ("warp", "conv", "fc"))
    times = interleaved_times(measures, args.rounds)
    print(
        f"{args.backbone}: {args.regions} regions of a {size[0]}x{size[1]} image, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds; load {os.getloadavg()[0]:.2f}"
    )
    for b, t in times.items():
        median, best = (1e3 * v / args.regions for v in (statistics.median(t), min(t)))
        print(f"  region_batch {b:4d}: median {median:.3f} ms/region, min {best:.3f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
