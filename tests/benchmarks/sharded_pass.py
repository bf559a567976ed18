"""The child processes of test_distributed's shared test pass (a module of few imports: each of the two
spawned processes imports it)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from rcnn_bench.benchmarks.harness.data import TestSet
from rcnn_bench.benchmarks.harness.inference import TimingPlan, time_pass
from rcnn_bench.datasets.voc import VOCDataset
from rcnn_bench.pipelines.fast_rcnn import FastRCNN, FastRCNNConfig

from tests.conftest import build_context
from tests.pipelines.helpers import jittered_proposals


def _test_set(root: Path) -> TestSet:
    ds = VOCDataset(root, "test")
    images = [torch.from_numpy(ds.load_image(i)) for i in range(len(ds))]
    boxes = [torch.from_numpy(b) for b in jittered_proposals(ds.annotations, 6, seed=1)]
    return TestSet(images, boxes, ds.annotations)


def pass_in_two(rank: int, root: str, init_file: str, out: str) -> None:
    """One process of the two: the untrained (seeded) Fast R-CNN's pass alone, then shared out."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = FastRCNNConfig(scale=64, max_size=128, max_per_image=3, max_per_set_factor=1)
    det = {"fast_rcnn": FastRCNN(cfg, build_context(4))}
    test = _test_set(Path(root))
    plan = TimingPlan((0,), tuple(range(1, len(test.images))))
    cpu = torch.device("cpu")
    boxes = lambda name, i: test.boxes[i]  # noqa: E731
    alone = time_pass(det, test, boxes, plan, cpu)["fast_rcnn"]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    shared = time_pass(det, test, boxes, plan, cpu)["fast_rcnn"]
    dist.destroy_process_group()
    torch.save(
        {
            "alone": [(d.boxes, d.scores, d.labels) for d in alone.detections],
            "shared": [(d.boxes, d.scores, d.labels) for d in shared.detections],
            "timed": len(shared.samples_ms),
        },
        Path(out) / f"rank{rank}.pt",
    )
