"""Shared fixtures: a tiny synthetic VOC folder (generated once per session) and a tiny run config;
and what a test's child process needs to feel Ctrl-C."""

from __future__ import annotations

import signal

import pytest
import torch
from rcnn_bench.datasets.synthetic import SyntheticConfig, generate

TINY_DATA = SyntheticConfig(
    seed=3,
    train_images=6,
    test_images=4,
    min_size=(64, 80),
    max_size=(80, 96),
    max_objects=3,
    min_side=12,
    max_side_fraction=0.6,
)


def default_sigint() -> None:
    """A ``preexec_fn`` for a child that a test interrupts: SIGINT back to its default action.
    A shell starts background jobs with SIGINT ignored, the ignoring survives exec, and a Python
    started that way never raises KeyboardInterrupt (so `make test &` failed the Ctrl-C tests)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory):
    """(folder, what the generator wrote) of a 6 + 4 image synthetic VOC folder."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    written = generate(root, TINY_DATA)
    return root, written


def build_context(num_classes: int, cache_dir=".", backbone_cfg=None):
    """What the harness hands a pipeline's constructor, for one CPU pipeline in a test."""
    from pathlib import Path

    from rcnn_bench.pipelines.context import BuildContext
    from rcnn_bench.pipelines.parts.backbones import BackboneConfig, build_backbone, clone

    backbone = build_backbone(backbone_cfg or BackboneConfig())
    return BuildContext(num_classes, torch.device("cpu"), lambda: clone(backbone), Path(cache_dir))
