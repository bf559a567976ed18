"""Several processes give one process's answers: the ranks' shares of a mini-batch are the one batch,
a test pass shared out over two gloo processes gives the same detections as one process with the same
weights, and `torchrun --nproc_per_node 2 -m rcnn_bench.benchmarks.cli run` matches a one-process run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from rcnn_bench.benchmarks.reporting.results import read_results
from rcnn_bench.pipelines import fast_rcnn, rcnn
from rcnn_bench.pipelines.fast_rcnn import FastRCNN, FastRCNNConfig
from rcnn_bench.pipelines.parts.batches import training_regions
from rcnn_bench.pipelines.parts.roi_head import detection_loss
from rcnn_bench.pipelines.parts.scoring import ScoreBudget
from rcnn_bench.pipelines.rcnn import RCNN, RCNNConfig
from rcnn_bench.pipelines.runtime import distributed
from rcnn_bench.pipelines.runtime.timing import StageTimer

from tests.benchmarks.sharded_pass import pass_in_two
from tests.benchmarks.test_run import tiny_overrides
from tests.conftest import build_context
from tests.pipelines.test_fast_rcnn import _tiny_data

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


def test_shares_are_disjoint_and_make_the_whole(monkeypatch):
    for world in (1, 2, 3):
        shares = []
        for r in range(world):
            _as_rank(monkeypatch, r, world)
            shares.append(list(distributed.share(7)))
        assert sorted(i for s in shares for i in s) == list(range(7))
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]


def test_a_batch_that_does_not_split_names_its_key(monkeypatch):
    _as_rank(monkeypatch, 0, 2)
    with pytest.raises(ValueError, match=r"^pipelines\.fast_rcnn\.images_per_batch: a batch of 3"):
        FastRCNN(FastRCNNConfig(images_per_batch=3), build_context(4))


def test_loss_shares_add_up_to_the_batch_loss():
    gen = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(6, 3, generator=gen), torch.randn(6, 8, generator=gen)
    labels, targets = torch.tensor([1, 0, 2, 2, 0, 1]), torch.randn(6, 4, generator=gen)
    whole = sum(detection_loss(logits, deltas, labels, targets, 2.0))
    halves = [
        sum(detection_loss(logits[k], deltas[k], labels[k], targets[k], 2.0, count=6))
        for k in (slice(0, 6, 2), slice(1, 6, 2))
    ]
    torch.testing.assert_close(halves[0] + halves[1], whole)


def _one_step(params, solver, loss_fn, desc):
    """run_sgd without the optimiser: one mini-batch, built and discarded."""
    loss_fn(0)
    return [0.0]


def test_rcnn_ranks_draw_the_one_process_windows(tiny_voc, tmp_path, monkeypatch):
    cfg = RCNNConfig(context_pad=4, batch_size=8)
    data = _tiny_data(tiny_voc)
    rois, _, matches = training_regions(data, cfg.fg_iou)
    monkeypatch.setattr(rcnn, "run_sgd", _one_step)
    warped: dict[int, list] = {}

    def record(self, image, boxes):  # the boxes each rank warps, in place of the warp
        warped[distributed.rank()].extend(boxes.tolist())
        s = self.net.input_size
        return torch.zeros((len(boxes), 3, s, s))

    monkeypatch.setattr(RCNN, "_warp", record)
    seen = []
    for r, world in ((0, 1), (0, 2), (1, 2)):
        _as_rank(monkeypatch, r, world)
        warped[r] = []
        RCNN(cfg, build_context(4, tmp_path))._finetune(data, rois, matches)
        seen.append(warped[r])
    # 7 of the 8 (too few background windows): every other window to each rank.
    assert len(seen[0]) == 7 and len(seen[1]) == 4 and len(seen[2]) == 3
    assert sorted(seen[1] + seen[2]) == sorted(seen[0])


def test_fast_rcnn_ranks_draw_the_one_process_batch(tiny_voc, tmp_path, monkeypatch):
    data = _tiny_data(tiny_voc)
    cfg = FastRCNNConfig(scale=64, max_size=128, rois_per_image=16, svd_ranks=((8, 8),))
    monkeypatch.setattr(fast_rcnn, "run_sgd", _one_step)
    batches = []

    def record(net, heads, features, rois, labels, targets, weight, count=None):
        batches.append((features.shape[0], rois, labels, count))
        return torch.zeros(())

    monkeypatch.setattr(fast_rcnn, "head_loss", record)
    for r, world in ((0, 1), (0, 2), (1, 2)):
        _as_rank(monkeypatch, r, world)
        FastRCNN(cfg, build_context(4, tmp_path)).fit(data, StageTimer(torch.device("cpu")))
    (n1, rois1, lab1, count1), *two = batches
    assert n1 == 2 and count1 == len(lab1)
    # Rank r's only image is image r of the one-process batch (padded to the batch's size).
    for r, (n, rois, labels, count) in enumerate(two):
        rows = rois1[:, 0] == r
        assert n == 1 and count == len(lab1) and torch.equal(rois[:, 0], torch.zeros(len(rois)))
        assert torch.equal(rois[:, 1:], rois1[rows, 1:]) and torch.equal(labels, lab1[rows])


def test_budgets_of_shares_merge_to_the_one_pass_budget():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(20, 3, generator=gen) for _ in range(6)]
    one = ScoreBudget(3, max_per_image=4, max_per_set=10)
    for s in scores:
        one.candidates(s)
    shares = [ScoreBudget(3, 4, 10) for _ in range(2)]
    for k, s in enumerate(scores):
        shares[k % 2].candidates(s)
    merged = ScoreBudget.merge(shares)
    # 6 images x 4 candidates > 10: every class's threshold is the 10th highest of the images' top 4;
    # each share alone (3 images, 12 candidates) has a lower one.
    top4 = torch.cat([s.topk(4, dim=0).values for s in scores])  # (24, 3)
    tenth = top4.sort(dim=0).values[-10].tolist()
    assert merged.thresholds == one.thresholds == tenth
    assert all(b.thresholds[j] < tenth[j] for b in shares for j in range(3))


def _same(a, b) -> bool:
    return all(
        torch.equal(x, y) for da, db in zip(a, b, strict=True) for x, y in zip(da, db, strict=True)
    )


def test_a_pass_shared_by_two_gloo_processes_gives_one_process_detections(tiny_voc, tmp_path):
    mp.spawn(pass_in_two, args=(str(tiny_voc[0]), str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    alone = ranks[0]["alone"]
    assert len(alone) == 4 and sum(len(labels) for _, _, labels in alone) > 0
    for got in ranks:
        assert got["timed"] == 3 and _same(got["shared"], alone)
    # The budget pruned across the shares: 4 images x 3 candidates per class exceed the pass's 4, so
    # only the detections above each class's 4th-highest candidate stay, at most 3 per class.
    labels = torch.cat([labels for _, _, labels in alone])
    assert int(torch.bincount(labels).max()) <= 3


def _cli_run(work: Path, launcher: list[str], env: dict) -> dict:
    cmd = [
        *launcher,
        "-m",
        "rcnn_bench.benchmarks.cli",
        "run",
        "--config",
        "benchmarks/configs/ci.yaml",
    ]
    for item in tiny_overrides(work):
        cmd += ["--set", item]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return read_results(work / "reports" / "latest")


@pytest.mark.skipif(shutil.which(str(TORCHRUN)) is None, reason="torchrun is not installed")
def test_torchrun_two_processes_match_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = _cli_run(tmp_path / "one", [sys.executable], env)
    two = _cli_run(tmp_path / "two", [str(TORCHRUN), "--standalone", "--nproc_per_node", "2"], env)
    assert one["env"]["world_size"] == 1 and two["env"]["world_size"] == 2
    # Rank 0 alone wrote: one run folder, one history line.
    reports = tmp_path / "two" / "reports"
    assert len([p for p in reports.iterdir() if p.is_dir() and not p.is_symlink()]) == 1
    assert len((reports / "history.jsonl").read_text().splitlines()) == 1
    assert "Trained data-parallel on 2 processes" in (reports / "latest" / "report.md").read_text()
    assert one["proposals"]["sha1"] == two["proposals"]["sha1"]
    # Training differs only in the order of the gradient sums (the backbone's pre-training, itself
    # data-parallel, and each pipeline's): the weights in their last bits, so the detections agree to
    # float rounding (scores measured 6e-5 apart) and the scores to the AP.
    for name in ("rcnn", "fast_rcnn"):
        a, b = one["pipelines"][name], two["pipelines"][name]
        assert a["map"] == b["map"]
        assert {v: x["map"] for v, x in a["variants"].items()} == {
            v: x["map"] for v, x in b["variants"].items()
        }
    for ea, eb in zip(one["examples"], two["examples"], strict=True):
        for name, da in ea["detections"].items():
            db = eb["detections"][name]
            assert da["labels"] == db["labels"]
            np.testing.assert_allclose(da["boxes"], db["boxes"], atol=1e-3, rtol=0)
            np.testing.assert_allclose(da["scores"], db["scores"], atol=2e-4, rtol=0)
