"""The paper configs' fidelity tables: kept in docs/, and every deviation declared with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from rcnn_bench.benchmarks.cli import main
from rcnn_bench.benchmarks.config import ConfigError, load_config
from rcnn_bench.benchmarks.reporting.fidelity import PAPER_CONFIGS, fidelity_rows
from rcnn_bench.pipelines.originals import (
    FAST_RCNN_REPO,
    FASTER_RCNN_REPO,
    RCNN_REPO,
    SPP_NET_REPO,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_docs_hold_each_paper_configs_table(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = f"benchmarks/configs/{name}.yaml"
    assert main(["fidelity", "--config", config, "--markdown"]) == 0
    made = capsys.readouterr().out
    kept = (ROOT / "docs" / f"fidelity-{name}.md").read_text()
    assert kept == made, (
        f"docs/fidelity-{name}.md is stale: rcnn-bench fidelity --config {config} --markdown "
        f"> docs/fidelity-{name}.md"
    )


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_declare_every_deviation_with_its_reason(name):
    rows = fidelity_rows(load_config(ROOT / "benchmarks" / "configs" / f"{name}.yaml"))
    undeclared = [
        f"{r.pipeline}: {r.name}" for r in rows if r.status == "deviation" and not r.reason
    ]
    stale = [f"{r.pipeline}: {r.name}" for r in rows if r.status != "deviation" and r.reason]
    assert undeclared == [], f"{name}.yaml departs from the originals without a reason"
    assert stale == [], f"{name}.yaml declares deviations from rows that are not"


def test_a_deviation_is_declared_and_shown_with_its_reason():
    plain = {(r.pipeline, r.name): r for r in fidelity_rows(load_config(None))}
    assert plain["rcnn", "foreground IoU"].status == "match"
    cfg = load_config(
        None,
        [
            "pipelines.rcnn.fg_iou=0.6",
            "deviations.rcnn.foreground IoU=a stricter foreground",
        ],
    )
    row = {(r.pipeline, r.name): r for r in fidelity_rows(cfg)}["rcnn", "foreground IoU"]
    assert (row.value, row.status, row.reason) == ("0.6", "deviation", "a stricter foreground")


@pytest.mark.parametrize(
    "override, message",
    [
        ("deviations.rcnn.no such row=x", "deviations.rcnn: no row 'no such row'"),
        ("deviations.nope.iterations run=x", "deviations.nope: no fidelity table"),
        ("deviations.rcnn.iterations run=' '", "deviations.rcnn.iterations run: give the reason"),
        ("deviations.rcnn=3", "deviations.rcnn: expected a mapping"),
    ],
)
def test_bad_deviations_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_difficult_objects_are_each_pipelines_own_setting():
    rows = fidelity_rows(load_config(ROOT / "benchmarks" / "configs" / "vgg16_voc07.yaml"))
    found = {r.pipeline: r for r in rows if r.name == "difficult objects are training targets"}
    assert {p: (r.original, r.value) for p, r in found.items()} == {
        "rcnn": ("True", "True"),
        "fast_rcnn": ("True", "True"),
        "sppnet": ("True", "True"),
        "faster_rcnn": ("False", "False"),  # py-faster-rcnn: use_diff False
    }


def paper_rows(name: str) -> dict:
    rows = fidelity_rows(load_config(ROOT / "benchmarks" / "configs" / f"{name}.yaml"))
    return {(r.pipeline, r.name): r for r in rows}


def test_rows_of_an_original_without_the_backbone_name_the_network_they_are_from():
    rows = paper_rows("alexnet_voc07")
    vgg16 = "py-faster-rcnn has no AlexNet model: value of its VGG16 recipe; "
    lr = rows["faster_rcnn", "base learning rate"]
    assert lr.source == (
        f"{vgg16}{FASTER_RCNN_REPO} models/pascal_voc/VGG16/faster_rcnn_end2end/solver.prototxt:2"
    )
    assert (lr.original, lr.value, lr.status) == ("0.001", "0.001", "match")
    # VGG16's two images per step: VGG_CNN_M_1024's solver has no iter_size.
    step = rows["faster_rcnn", "images per SGD step, one per forward pass"]
    assert step.source.startswith(vgg16) and (step.original, step.status) == ("2", "match")
    frozen = rows["faster_rcnn", "leading conv layers frozen"]
    assert frozen.source == (
        "py-faster-rcnn has no AlexNet model: value of its VGG_CNN_M_1024 recipe; "
        f"{FASTER_RCNN_REPO} VGG16 conv1_1-conv2_2: "
        "models/pascal_voc/VGG16/faster_rcnn_end2end/train.prototxt:20-27,45-52,81-88,106-113; "
        "the AlexNet-size VGG_CNN_M_1024 conv1: "
        "models/pascal_voc/VGG_CNN_M_1024/faster_rcnn_end2end/train.prototxt:19-26"
    )
    assert (frozen.original, frozen.value, frozen.status) == ("1", "1", "match")
    svm_c = rows["sppnet", "SVM C"]
    assert svm_c.source == (
        f"SPP_net has no AlexNet model: value of its ZF-5 recipe; {SPP_NET_REPO} spp_train.m:43"
    )
    notes = {"faster_rcnn": "py-faster-rcnn has no AlexNet model: ", "sppnet": "SPP_net has no "}
    for (pipeline, name), row in rows.items():
        if pipeline in notes:
            assert row.source.startswith(notes[pipeline]), (pipeline, name)
    # R-CNN and Fast R-CNN have CaffeNet, AlexNet's counterpart: no note.
    assert rows["rcnn", "SVM C"].source == f"{RCNN_REPO} rcnn_train.m:34"
    assert (
        rows["fast_rcnn", "momentum"].source == f"{FAST_RCNN_REPO} models/VGG16/solver.prototxt:9"
    )


def test_vgg16_rows_name_zf5_for_sppnet_and_the_branch_batch_for_rcnn():
    rows = paper_rows("vgg16_voc07")
    assert rows["sppnet", "SVM C"].source == (
        f"SPP_net has no VGG16 model: value of its ZF-5 recipe; {SPP_NET_REPO} spp_train.m:43"
    )
    lr = rows["faster_rcnn", "base learning rate"]
    assert lr.source == (
        f"{FASTER_RCNN_REPO} models/pascal_voc/VGG16/faster_rcnn_end2end/solver.prototxt:2"
    )
    # rcnn's master has no VGG16 recipe; the vgg-verydeep branch's takes 24 windows per batch.
    batch = rows["rcnn", "regions per fine-tuning batch"]
    assert (batch.original, batch.value, batch.status) == ("24", "128", "deviation")
    assert batch.source.endswith(
        "rbgirshick/rcnn@f7ca3b3 finetuning/vgg16/vgg16_pascal_finetune_trainval_test.prototxt:9"
    )
    assert rows["rcnn", "regions per fine-tuning batch"].reason
    assert paper_rows("alexnet_voc07")["rcnn", "regions per fine-tuning batch"].status == "match"
