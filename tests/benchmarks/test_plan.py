"""`rcnn-bench run --dry-run`: the plan of a tiny config, its estimates against hand-computed ones, and
the one-line refusals."""

from __future__ import annotations

import shutil

import pytest
from rcnn_bench.benchmarks.cli import main
from rcnn_bench.benchmarks.config import load_config
from rcnn_bench.benchmarks.harness import plan as plan_module
from rcnn_bench.benchmarks.harness.data import load_splits
from rcnn_bench.benchmarks.harness.plan import (
    Probe,
    check_memory,
    dry_run,
    memory_plan,
    stage_estimates,
)
from rcnn_bench.pipelines.parts.backbones import build_backbone

from tests.benchmarks.test_run import tiny_overrides

CONFIG = "benchmarks/configs/default.yaml"


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("probe", ["estimate", "full"])
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, probe):
    cfg = load_config(CONFIG, tiny_overrides(tmp_path))
    plan = dry_run(cfg, probe)
    assert (plan.rates is None) == (probe == "full")
    out = capsys.readouterr().out
    assert not (tmp_path / "reports").exists() and not _files(tmp_path / "cache")
    # 5 training and 4 test images, no proposal cache: at most 30 proposals each.
    assert plan.splits == {
        "trainval": {"images": 5, "proposals": 150, "cached": False},
        "test": {"images": 4, "proposals": 120, "cached": False},
    }
    # Proposals: 9 images x 30 boxes x 4 float32. R-CNN: 150 regions' fc7 (256 wide, float16) and
    # pool5 (128 x 4 x 4) of a tenth of them; Fast R-CNN's "svm" variant: fc7 of every RoI.
    assert plan.disk["proposals"] == 9 * 30 * 16
    assert plan.disk["rcnn"] == 2 * 150 * 256 + 2 * 15 * 2048
    assert plan.disk["fast_rcnn"] == 2 * 150 * 256
    # The backbone's pre-training (2 iterations here) is not cached: its time is estimated too.
    assert set(plan.stages_s) == {"proposals", "backbone", "rcnn", "fast_rcnn"}
    assert list(plan.stages_s["backbone"]) == ["pre-training"]
    assert list(plan.stages_s["rcnn"]) == ["finetune", "features", "svm", "bbox_reg", "test passes"]
    for line in ("trainval", "backbone pre-training", "rcnn finetune", "RAM peak", "disk ("):
        assert line in out


def test_plan_options_without_a_dry_run_refuse_in_one_line(tmp_path, capsys):
    args = ["run", "--config", CONFIG, "--plan-for", "h100"]
    for item in tiny_overrides(tmp_path):
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "rcnn-bench: error: --probe and --plan-for go with --dry-run (a run measures, it does not plan)"
    )
    assert not (tmp_path / "reports").exists()


def test_a_full_disk_refuses_in_one_line_naming_the_knob(tmp_path, monkeypatch, capsys):
    args = ["run", "--dry-run", "--config", CONFIG]
    for item in tiny_overrides(tmp_path):
        args += ["--set", item]
    free = 1000  # bytes: less than the R-CNN cache
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 0, free))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "set pipelines.rcnn.features: none" in err
    assert not (tmp_path / "reports").exists()


def _probe() -> Probe:
    return Probe(
        images=2,
        proposal_s=0.2,
        train_s={
            "rcnn": {"finetune": 0.5, "features": 1.0, "svm": 0.3, "bbox_reg": 0.1},
            "fast_rcnn": {"train": 0.8, "svd_16_8/svd": 0.4, "svm/features": 0.2, "svm/svm": 0.1},
        },
        detect_s={"rcnn": 0.1, "fast_rcnn": 0.05},
        peak_bytes={"rcnn": 3000, "fast_rcnn": 5000},
        model_bytes={"rcnn": 100, "fast_rcnn": 200},
        passes={"rcnn": 2, "fast_rcnn": 3},
    )


def test_stage_estimates_scale_the_probe(tmp_path):
    overrides = [*tiny_overrides(tmp_path), "pipelines.rcnn.solver.iters=500"]
    cfg = load_config(CONFIG, overrides)
    splits = load_splits(cfg.data)
    counts = {"trainval": {"images": 5, "cached": False}, "test": {"images": 4, "cached": True}}
    est = stage_estimates(cfg, splits, counts, _probe())
    # Iterations: 0.5 s for the probe's 2 -> 500 (R-CNN), 2 -> 2 (Fast R-CNN); per-image stages: x 5/2;
    # the SVD as measured; test passes: 4 images x passes; selective search: 5 uncached images x
    # 0.2 s over 1 worker.
    assert est["proposals"] == {"selective search": pytest.approx(1.0)}
    assert est["rcnn"] == pytest.approx(
        {"finetune": 125.0, "features": 2.5, "svm": 0.75, "bbox_reg": 0.25, "test passes": 0.8}
    )
    assert est["fast_rcnn"] == pytest.approx(
        {
            "train": 0.8,
            "svd_16_8/svd": 0.4,
            "svm/features": 0.5,
            "svm/svm": 0.25,
            "test passes": 0.6,
        }
    )
    # bench.seeds 3: two more trainings (R-CNN 128.5 s) and one pass each over 4 images at 0.1 s.
    three = stage_estimates(
        load_config(CONFIG, [*overrides, "bench.seeds=3"]), splits, counts, _probe()
    )
    assert three["rcnn"]["more seeds"] == pytest.approx(2 * (128.5 + 0.4))
    assert three["fast_rcnn"]["more seeds"] == pytest.approx(2 * (0.8 + 0.4 + 0.5 + 0.25 + 0.2))


def test_memory_plan_adds_up_and_refuses_naming_the_biggest(tmp_path, monkeypatch):
    cfg = load_config(CONFIG, tiny_overrides(tmp_path))
    splits = load_splits(cfg.data)
    backbone = build_backbone(cfg.backbone)
    monkeypatch.setattr(plan_module, "_available_ram", lambda: 10**9)
    mem = memory_plan(cfg, splits, backbone, _probe(), plan_module.torch.device("cpu"), 7)
    pixels = [
        sum(h * w * 3 for h, w in (a.size for a in ds.annotations))
        for ds in (splits.train, splits.test)
    ]
    # R-CNN: 150 regions x 96 bytes + its 3000-byte probe peak; Fast R-CNN: only its 5000-byte peak.
    assert mem["ram"] == {
        "libraries": 7,
        "train images": pixels[0],
        "proposals": 9 * 30 * 16,
        "rcnn training": 150 * 96 + 3000,
        "test images": pixels[1],
        "models": 300,
        "total": 7 + pixels[0] + 9 * 30 * 16 + 150 * 96 + 3000 + pixels[1] + 300,
        "available": 10**9,
    }
    assert mem["gpu"] is None
    check_memory(mem)  # fits
    mem["ram"]["available"] = 10
    with pytest.raises(
        ValueError, match=r"^RAM: .* the most is train images .*lower data.train_limit$"
    ):
        check_memory(mem)
    mem["ram"]["rcnn training"] = 10**8
    with pytest.raises(ValueError, match=r"the most is rcnn training .*pipelines\.rcnn"):
        check_memory(mem)
