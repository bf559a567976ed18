"""What every pipeline is built from and shown beside: the types that the Detector interface
(pipelines.detector) and the registry (pipelines.registry) both name, in a module of their own so that
neither of the two imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rcnn_bench.pipelines.parts.backbones import Backbone

__all__ = ["BuildContext", "PaperFigures"]


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
        seed: the run's training seed (config ``seed``): a pipeline adds it to each seed of its own
            config (the solver's mini-batch sampling, a new layer's initial weights), so that one
            number draws a new training of every pipeline on the same data, proposals and
            pre-trained weights (``bench.seeds``).
    """

    num_classes: int
    device: torch.device
    backbone: Callable[[], Backbone]
    cache_dir: Path
    seed: int = 0
