"""The pipeline registry: a name -> Detector class dict, filled by each pipeline module at import.

A pipeline is one module in this package that defines a Detector subclass and decorates it with
``@register``. The class names its config dataclass (``config_class``), declares what it needs and
offers (``owns_proposals``, ``variants``, ``train_stages``) and carries the paper's figures as data
(``paper``); the harness asks the class and never names a pipeline. Every registered class is built the
same way: ``cls(cfg, context)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipelines.backbones import Backbone
    from pipelines.detector import Detector

__all__ = ["BUILTIN_MODULES", "BuildContext", "PaperFigures", "get", "register", "registered"]

# The modules that define the built-in pipelines; importing them registers their classes.
BUILTIN_MODULES = (
    "pipelines.rcnn",
    "pipelines.fast_rcnn",
    "pipelines.sppnet",
    "pipelines.faster_rcnn",
)

# The pipeline speedups are measured against unless a config says otherwise.
DEFAULT_BASELINE = "rcnn"

# results.json schema 1 held exactly these two pipelines, the first the baseline of its one speedup.
SCHEMA1_PIPELINES = ("rcnn", "fast_rcnn")

_REGISTRY: dict[str, type[Detector]] = {}


@dataclass(frozen=True)
class PaperFigures:
    """A pipeline's published figures, shown beside a run's (None where the paper gives none).

    Attributes:
        source: where they come from ("Fast R-CNN paper, Table 4, VGG16, K40 GPU, VOC07 test").
        train_hours: training time.
        test_seconds: test time per image, proposals excluded.
        voc07_map: VOC07 test mAP in percent.
        end_to_end_seconds: test time per image with the proposals (where the paper gives it).
    """

    source: str
    train_hours: float | None = None
    test_seconds: float | None = None
    voc07_map: float | None = None
    end_to_end_seconds: float | None = None


@dataclass(frozen=True)
class BuildContext:
    """What every pipeline is built from besides its own config block.

    Attributes:
        num_classes: K (labels 1..K, background 0).
        device: where its networks run.
        backbone: returns a fresh copy of the shared backbone with the shared initial weights (each
            call a new copy, so that pipelines never train each other's weights).
        cache_dir: where a pipeline may keep training-time files (R-CNN's feature cache).
    """

    num_classes: int
    device: torch.device
    backbone: Callable[[], Backbone]
    cache_dir: Path


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a registered pipeline needs a name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pipeline {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def registered() -> dict[str, type[Detector]]:
    """Every registered pipeline, built-ins first, in registration order."""
    _load_builtins()
    return dict(_REGISTRY)


def get(name: str) -> type[Detector]:
    """The pipeline class registered as ``name``.

    Raises:
        ValueError: no pipeline has that name (the message lists the known ones).
    """
    known = registered()
    if name not in known:
        raise ValueError(f"no pipeline named {name!r} (known: {', '.join(known)})")
    return known[name]
