from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.config import ConfigError, RunConfig, load_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.name == path.stem


def test_defaults_and_overrides_keep_section_defaults():
    cfg = load_config(None, ["rcnn.solver.iters=7", "fast_rcnn.bg_iou=[0.0, 0.5]"])
    assert cfg.rcnn.solver.iters == 7 and cfg.rcnn.solver.paper_iters == 100000
    assert cfg.fast_rcnn.bg_iou == (0.0, 0.5)
    assert to_dict(cfg)["fast_rcnn"]["bg_iou"] == [0.0, 0.5]


@pytest.mark.parametrize(
    "text, message",
    [
        ("rcnn:\n  solvr: {iters: 3}\n", "unknown key 'rcnn.solvr'"),
        ("colour: red\n", "unknown key 'colour'"),
        ("rcnn:\n  solver: {iters: many}\n", "rcnn.solver.iters: expected an integer, got 'many'"),
        ("backbone: {name: resnet}\n", "backbone.name must be one of"),
        ("data: [1, 2]\n", "data: expected a mapping"),
        ("rcnn: {keep_feature_cache: 1}\n", "expected true or false"),
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
    with pytest.raises(ConfigError, match="nope.yaml: config file is missing"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["rcnn.solver.iters"])
    with pytest.raises(ConfigError, match="unknown key 'bench.timed'"):
        load_config(None, ["bench.timed=3"])
