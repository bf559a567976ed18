"""The pipeline registry: a name -> Detector class dict, filled by each pipeline module at import.

A pipeline is one module in this package that defines a Detector subclass and decorates it with
``@register``. The class names its config dataclass (``config_class``), declares what it needs and
offers (``owns_proposals``, ``variants``, ``train_stages``) and carries the paper's figures as data
(``paper``); the harness asks the class and never names a pipeline. Every registered class is built the
same way: ``cls(cfg, context)``, ``context`` a pipelines.context.BuildContext.
"""

from __future__ import annotations

import importlib

from rcnn_bench.pipelines.detector import Detector

__all__ = ["BUILTIN_MODULES", "get", "register", "registered"]

# The modules that define the built-in pipelines; importing them registers their classes.
BUILTIN_MODULES = (
    "rcnn_bench.pipelines.rcnn",
    "rcnn_bench.pipelines.fast_rcnn",
    "rcnn_bench.pipelines.sppnet",
    "rcnn_bench.pipelines.faster_rcnn",
)

# The pipeline speedups are measured against unless a config says otherwise.
DEFAULT_BASELINE = "rcnn"

# results.json schema 1 held exactly these two pipelines, the first the baseline of its one speedup.
SCHEMA1_PIPELINES = ("rcnn", "fast_rcnn")

_REGISTRY: dict[str, type[Detector]] = {}


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
