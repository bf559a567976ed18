"""The fidelity table: each setting the originals fix, their value (file:line in their code, or the
paper), this run's value, and whether they match. Computed from the config, so it stays true."""

from __future__ import annotations

import pandas as pd

from benchmarks.config import RunConfig
from pipelines import registry
from pipelines.fidelity import FAST_RCNN_REPO, RCNN_REPO, Setting, setting

__all__ = ["fidelity_rows", "fidelity_table"]


def _backbone_value(cfg: RunConfig) -> str:
    """The backbone and where its initial weights come from."""
    b = cfg.backbone
    if b.pretrain.iters:
        return f"{b.name} (pre-trained on synthetic crops, {b.pretrain.iters} iterations)"
    return f"{b.name} ({b.weights})"


def _shared(cfg: RunConfig) -> list[Setting]:
    """The settings every pipeline shares: data, proposals, backbone."""
    p = cfg.proposals
    return [
        setting(
            "shared",
            "backbone",
            "vgg16 (imagenet)",
            "Fast R-CNN paper, Table 4",
            _backbone_value(cfg),
        ),
        setting(
            "shared",
            "difficult objects are training targets",
            True,
            f"{RCNN_REPO} imdb/roidb_from_voc.m:37,65-69; {FAST_RCNN_REPO} "
            "lib/datasets/pascal_voc.py:204-222",
            cfg.data.train_difficult,
        ),
        setting(
            "shared",
            "selective search mode",
            "fast",
            f"{RCNN_REPO} selective_search/selective_search_boxes.m:6-8",
            p.mode,
        ),
        setting(
            "shared",
            "proposals per image, at most",
            2000,
            f"{RCNN_REPO} data/README.md:57 (about 2k per image)",
            p.max_proposals,
        ),
        setting(
            "shared",
            "smallest proposal side (px)",
            20.0,
            f"{RCNN_REPO} selective_search/selective_search_boxes.m:39; VOC07 used the authors' "
            "precomputed boxes (data/README.md:55), so unknown there",
            p.min_side,
            known=False,
        ),
    ]


# Both originals ran Caffe, which computes in float (pycaffe's Dtype), on a K40 (Fast R-CNN Table 4),
# whose Kepler cores have no TF32 (it came with Ampere).
_CAFFE_FLOAT = (
    "Caffe's float: rbgirshick/caffe-fast-rcnn@28a579e python/caffe/_caffe.cpp:32, "
    f"{FAST_RCNN_REPO} tools/test_net.py:73-75; a K40 (Fast R-CNN paper, Table 4) has no TF32"
)


def _arithmetic(cfg: RunConfig) -> list[Setting]:
    """The arithmetic of the training and of the timed test passes."""
    train = "tf32" if cfg.train_tf32 else "fp32"
    return [
        setting("shared", "training arithmetic", "fp32", _CAFFE_FLOAT, train),
        setting("shared", "test-time arithmetic", "fp32", _CAFFE_FLOAT, cfg.bench.precision),
    ]


def fidelity_rows(cfg: RunConfig) -> list[Setting]:
    """The shared settings, then each configured pipeline's own."""
    rows = _shared(cfg) + _arithmetic(cfg)
    for name, block in cfg.pipelines.items():
        rows += registry.get(name).fidelity(block)
    return rows


def fidelity_table(rows: list[Setting] | list[dict]) -> pd.DataFrame:
    """The rows as a table (from Setting objects or from results.json's dicts)."""
    dicts = [r.as_dict() if isinstance(r, Setting) else r for r in rows]
    frame = pd.DataFrame(
        dicts, columns=["pipeline", "name", "original", "source", "value", "status"]
    )
    return frame.set_index(["pipeline", "name"]) if len(frame) else frame
