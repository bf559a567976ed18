"""Same config, same seed, same machine: the same proposals, losses, detections and APs, bit for bit;
and the same data in VOC and COCO form gives the same results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.harness.run import run
from rcnn_bench.benchmarks.reporting.results import read_results
from rcnn_bench.datasets.convert import voc_to_coco

from tests.benchmarks.test_run import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def _outcome(results: dict) -> dict:
    """What must not change between two runs: everything but times, paths and ids."""
    return {
        "proposals": results["proposals"]["sha1"],
        "losses": {n: r["train"]["info"] for n, r in results["pipelines"].items()},
        "map": {n: r["map"] for n, r in results["pipelines"].items()},
        "variants": {
            n: {v: x["map"] for v, x in r["variants"].items()}
            for n, r in results["pipelines"].items()
        },
        "detections": [e["detections"] for e in results["examples"]],
    }


def test_two_processes_give_identical_results(tmp_path):
    outcomes = []
    for k in range(2):  # fresh processes, every cache deleted in between (each has its own)
        work = tmp_path / f"run{k}"
        cmd = [
            sys.executable,
            "-m",
            "rcnn_bench.benchmarks.cli",
            "run",
            "--config",
            "benchmarks/configs/ci.yaml",
        ]
        for item in tiny_overrides(work):
            cmd += ["--set", item]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
        outcomes.append(_outcome(read_results(work / "reports" / "latest")))
    a, b = outcomes
    for key in a:
        assert a[key] == b[key], key
    assert (
        set(a["losses"]) == {"rcnn", "fast_rcnn"} and "finetune_final_loss" in a["losses"]["rcnn"]
    )


def test_voc_and_coco_forms_of_one_data_set_give_identical_results(tmp_path):
    voc = read_results(run(load_config("benchmarks/configs/ci.yaml", tiny_overrides(tmp_path))))
    coco_root = tmp_path / "coco"
    voc_to_coco(tmp_path / "data", coco_root)
    overrides = [
        *tiny_overrides(tmp_path),
        "data.kind=coco",
        f"data.root={coco_root}",
        "data.train_split=trainval.json",
        "data.test_split=test.json",
        "data.images=images",
        f"output_dir={tmp_path / 'coco-reports'}",
    ]
    coco = read_results(run(load_config("benchmarks/configs/ci.yaml", overrides)))
    assert (
        coco["dataset"]["kind"] == "coco"
        and coco["dataset"]["classes"] == voc["dataset"]["classes"]
    )
    a, b = _outcome(voc), _outcome(coco)
    # (The proposal hashes differ only because they cover the image ids: "test_00000" against "1".)
    for key in ("losses", "map", "variants", "detections"):
        assert a[key] == b[key], key


def test_setup_sets_the_training_arithmetic_from_train_tf32():
    import torch
    from rcnn_bench.benchmarks.machine.env import setup

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    saved = flags()
    try:
        for tf32 in (True, False):
            setup(load_config(None, ["device=cpu", f"train_tf32={str(tf32).lower()}"]))
            assert flags() == (tf32, tf32)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _per_pipeline(results: dict, name: str) -> dict:
    """One pipeline's losses, APs and example detections in a run's results."""
    record = results["pipelines"][name]
    return {
        "losses": record["train"]["info"],
        "map": record["map"],
        "detections": [e["detections"][name] for e in results["examples"]],
    }


def test_a_pipeline_scores_the_same_alone_and_beside_others_in_any_order(tmp_path):
    """Each pipeline is built and trained in its own seeded stream: which other pipelines the
    config holds, and in what order, changes none of its losses, detections or APs."""
    runs = {}
    for selection in ("rcnn,fast_rcnn", "fast_rcnn,rcnn", "fast_rcnn"):
        overrides = [
            *tiny_overrides(tmp_path),
            f"pipelines={selection}",
            f"bench.baseline={selection.split(',')[0]}",
            f"output_dir={tmp_path / selection.replace(',', '-')}",
            "pipelines.fast_rcnn.variants=[]",
        ]
        runs[selection] = read_results(run(load_config("benchmarks/configs/ci.yaml", overrides)))
    both, reversed_, alone = runs.values()
    assert list(reversed_["pipelines"]) == ["fast_rcnn", "rcnn"]
    assert _per_pipeline(both, "rcnn") == _per_pipeline(reversed_, "rcnn")
    for other in (reversed_, alone):
        assert _per_pipeline(both, "fast_rcnn") == _per_pipeline(other, "fast_rcnn")
