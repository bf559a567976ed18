from __future__ import annotations

import re
from pathlib import Path

import pytest
from rcnn_bench.benchmarks.config import ConfigError, RunConfig, load_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.name == path.stem


def test_defaults_and_overrides_keep_section_defaults():
    overrides = ["pipelines.rcnn.solver.iters=7", "pipelines.fast_rcnn.bg_iou=[0.0, 0.5]"]
    cfg = load_config(None, overrides)
    rcnn, fast = cfg.pipelines["rcnn"], cfg.pipelines["fast_rcnn"]
    assert rcnn.solver.iters == 7 and rcnn.solver.paper_iters == 70000
    assert fast.bg_iou == (0.0, 0.5) and fast.solver.iters == 1000
    assert to_dict(cfg)["pipelines"]["fast_rcnn"]["bg_iou"] == [0.0, 0.5]


def test_pipeline_subset_and_baseline(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("pipelines:\n  rcnn: {batch_size: 32}\n  fast_rcnn: {}\n")
    cfg = load_config(path, ["pipelines=rcnn"])
    assert list(cfg.pipelines) == ["rcnn"] and cfg.pipelines["rcnn"].batch_size == 32
    with pytest.raises(
        ConfigError, match=re.escape("bench.baseline: 'rcnn' is not among the pipelines run")
    ):
        load_config(path, ["pipelines=fast_rcnn"])
    cfg = load_config(path, ["pipelines=fast_rcnn", "bench.baseline=fast_rcnn"])
    assert list(cfg.pipelines) == ["fast_rcnn"]
    with pytest.raises(ConfigError, match="no pipeline named 'yolo'"):
        load_config(path, ["pipelines=rcnn,yolo"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("pipelines:\n  rcnn:\n    solvr: {iters: 3}\n", "unknown key 'pipelines.rcnn.solvr'"),
        ("colour: red\n", "unknown key 'colour'"),
        (
            "pipelines: {rcnn: {solver: {iters: many}}}\n",
            "pipelines.rcnn.solver.iters: expected an integer, got 'many'",
        ),
        ("backbone: {name: resnet}\n", "backbone.name must be one of"),
        ("data: [1, 2]\n", "data: expected a mapping"),
        ("pipelines: {rcnn: {keep_feature_cache: 1}}\n", "expected true or false"),
        ("pipelines: {sppnet2: {}}\n", "pipelines.sppnet2: no pipeline named 'sppnet2'"),
        (
            "pipelines: {rcnn: {variants: [fc8]}}\n",
            "pipelines.rcnn.variants: 'fc8' is not a variant of rcnn (its variants: no_bbox_reg,",
        ),
        (
            "pipelines: {fast_rcnn: {svd_ranks: [[64, 16]], variants: [svd_1024_256]}}\n",
            "pipelines.fast_rcnn.variants: 'svd_1024_256' is not a variant of fast_rcnn "
            "(its variants: svm, svd_64_16; or 'all')",
        ),
        ("pipelines: {fast_rcnn: {svd_ranks: [64, 16]}}\n", "pipelines.fast_rcnn.svd_ranks"),
        ("name: ../../x\n", "name: '../../x' is not a safe part of a folder name"),
        ("name: a/b\n", "name: 'a/b' is not a safe part of a folder name"),
        ("name: ..\n", "name: '..' is not a safe part of a folder name"),
        ("name: .hidden\n", "name: '.hidden' is not a safe part of a folder name"),
        ("name: a b\n", "name: 'a b' is not a safe part of a folder name"),
        ("a: [\n", "not valid YAML at line"),
        ("- 1\n", "expected a mapping at the top level"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("nope.yaml: config file is missing")):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=re.escape("expected key.path=value")):
        load_config(None, ["pipelines.rcnn.solver.iters"])
    with pytest.raises(ConfigError, match=re.escape("unknown key 'bench.timed'")):
        load_config(None, ["bench.timed=3"])


def test_fidelity_rows_give_the_arithmetic_of_training_and_test():
    from rcnn_bench.benchmarks.reporting.fidelity import fidelity_rows

    def rows(*overrides):
        cfg = load_config("benchmarks/configs/vgg16_voc07.yaml", list(overrides))
        found = {r.name: r for r in fidelity_rows(cfg) if r.pipeline == "shared"}
        return {
            k: (found[k].value, found[k].status)
            for k in ("training arithmetic", "test-time arithmetic")
        }

    assert rows() == {
        "training arithmetic": ("fp32", "match"),
        "test-time arithmetic": ("fp32", "match"),
    }
    assert rows("train_tf32=true", "bench.precision=bf16") == {
        "training arithmetic": ("tf32", "deviation"),
        "test-time arithmetic": ("bf16", "deviation"),
    }


def test_a_missing_voc_folder_is_named_with_what_it_must_hold(tmp_path):
    from rcnn_bench.benchmarks.harness.data import ensure_dataset

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "real.yaml",
        [f"data.root={tmp_path / 'nowhere'}"],
    )
    with pytest.raises(ValueError) as err:
        ensure_dataset(cfg.data)
    assert str(err.value) == (
        f"{tmp_path / 'nowhere'}: VOC folder not found (set data.root to a folder with JPEGImages/, "
        "Annotations/ and ImageSets/Main/; scripts/fetch_voc2007.sh fetches VOC2007)"
    )
    assert not (tmp_path / "nowhere").exists()  # nothing generated in its place
